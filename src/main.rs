fn main() -> std::process::ExitCode {
    raftchat::cli::main()
}
