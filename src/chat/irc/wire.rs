//! IRC protocol text: lines parsed into commands, replies and pushed messages written
//! within the 512-byte line limit.

use super::*;

/// One parsed client line.
#[derive(Debug, PartialEq)]
pub struct IrcLine {
    pub command: String,
    pub params: Vec<String>,
}

/// What a command costs the rate limit: one per target of a target list.
pub(super) fn write_cost(line: &IrcLine) -> u32 {
    match line.command.as_str() {
        "PRIVMSG" | "NOTICE" | "JOIN" | "PART" => line.params.first().map_or(1, |targets| {
            targets.split(',').filter(|t| !t.is_empty()).count().max(1)
        }) as u32,
        _ => 1,
    }
}

/// Splits a line into command and parameters (tags and source are dropped). `None` for a
/// line with no command.
pub fn parse(line: &str) -> Option<IrcLine> {
    let mut rest = line.trim_start();
    if let Some(tagged) = rest.strip_prefix('@') {
        rest = tagged.split_once(' ').map_or("", |(_, r)| r).trim_start();
    }
    if let Some(sourced) = rest.strip_prefix(':') {
        rest = sourced.split_once(' ').map_or("", |(_, r)| r).trim_start();
    }
    let (command, mut rest) = match rest.split_once(' ') {
        Some((c, r)) => (c, r),
        None => (rest, ""),
    };
    if command.is_empty() {
        return None;
    }
    let mut params = Vec::new();
    loop {
        rest = rest.trim_start_matches(' ');
        if rest.is_empty() {
            break;
        }
        if let Some(trailing) = rest.strip_prefix(':') {
            params.push(trailing.to_string());
            break;
        }
        match rest.split_once(' ') {
            Some((p, r)) => {
                params.push(p.to_string());
                rest = r;
            }
            None => {
                params.push(rest.to_string());
                break;
            }
        }
    }
    Some(IrcLine {
        command: command.to_ascii_uppercase(),
        params,
    })
}

/// Text safe for one IRC line: no CR or LF, cut to fit the 512-byte limit.
pub(super) fn line_safe(text: &str, budget: usize) -> String {
    let mut clean: String = text
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    if clean.len() > budget {
        let mut cut = budget;
        while !clean.is_char_boundary(cut) {
            cut -= 1;
        }
        clean.truncate(cut);
    }
    clean
}

pub(super) fn source(nick: &str) -> String {
    format!("{nick}!{nick}@{SERVER}")
}

/// `:from!from@raftchat PRIVMSG target :text`, with `time`/`msgid` tags when `tagged`, and
/// an `[HH:MM:SS]` prefix on the text when `stamp` (replays to clients without server-time).
pub(super) fn privmsg(m: &StoredMessage, tagged: bool, stamp: bool) -> Bytes {
    let head = format!(":{} PRIVMSG {} :", source(&m.from), m.to);
    let ts = rfc3339(m.ts_ms);
    let text = if stamp {
        format!("[{}] {}", ts.get(11..19).unwrap_or(""), m.text)
    } else {
        m.text.clone()
    };
    let body = format!(
        "{head}{}",
        line_safe(&text, MAX_BODY.saturating_sub(head.len()))
    );
    let line = if tagged {
        format!("@time={ts};msgid={} {body}\r\n", m.index)
    } else {
        format!("{body}\r\n")
    };
    Bytes::from(line)
}

pub(super) fn raw(line: String) -> Bytes {
    Bytes::from(format!("{line}\r\n"))
}

/// IRC lines for the shared delivery loop.
pub(super) struct IrcRender {
    pub(super) caps: Caps,
    pub(super) me: String,
}

impl IrcRender {
    fn tagged(&self) -> bool {
        self.caps.server_time || self.caps.message_tags
    }

    /// Without echo-message a client prints its own lines itself.
    fn skip(&self, m: &StoredMessage) -> bool {
        !self.caps.echo && fold(&m.from) == fold(&self.me)
    }
}

impl Render for IrcRender {
    fn message(&self, m: &MessageEvent) -> Option<Bytes> {
        if self.skip(&m.message) {
            return None;
        }
        let cache = if self.tagged() { &m.irc_tagged } else { &m.irc };
        Some(
            cache
                .get_or_init(|| privmsg(&m.message, self.tagged(), false))
                .clone(),
        )
    }

    fn stored(&self, m: &StoredMessage) -> Option<Bytes> {
        (!self.skip(m)).then(|| privmsg(m, self.tagged(), !self.tagged()))
    }

    fn presence(&self, room: &str, user: &str, joined: bool) -> Bytes {
        let verb = if joined { "JOIN" } else { "PART" };
        raw(format!(":{} {verb} {room}", source(user)))
    }

    fn too_slow(&self, _behind: u64) -> Bytes {
        raw("ERROR :Closing link: client too slow".into())
    }

    fn replaced(&self, why: &str) -> Bytes {
        raw(format!("ERROR :Closing link: {why}"))
    }

    fn unavailable(&self, why: &str) -> Bytes {
        raw(format!("ERROR :Closing link: {why}"))
    }
}

/// Most rooms a LIST, users a WHO answers with (each is a line; the output budget bounds the
/// rest).
pub(super) const MAX_LIST: usize = 1000;

/// An IRC line is at most 512 bytes with its CRLF.
pub(super) const MAX_LINE: usize = 512;

/// `names` in space-separated runs that fit after a `prefix_len`-byte prefix in one line.
pub(super) fn split_names(prefix_len: usize, names: &[String]) -> Vec<String> {
    let budget = MAX_LINE.saturating_sub(prefix_len + 2).max(1);
    let mut lines = Vec::new();
    let mut line = String::new();
    for name in names {
        if !line.is_empty() && line.len() + 1 + name.len() > budget {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(name);
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_split_to_fit_512_byte_lines() {
        let names: Vec<String> = (0..300).map(|i| format!("user{i:04}")).collect();
        let prefix = ":raftchat 353 somebody = #big :".len();
        let lines = split_names(prefix, &names);
        assert!(lines.len() > 1);
        for l in &lines {
            assert!(
                prefix + l.len() + 2 <= 512,
                "{} bytes",
                prefix + l.len() + 2
            );
        }
        let back: Vec<&str> = lines.iter().flat_map(|l| l.split(' ')).collect();
        assert_eq!(back, names.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(split_names(prefix, &[]), vec![String::new()]);
    }

    use super::*;

    #[test]
    fn parses_tags_source_and_trailing() {
        let l = parse("@label=x :nick!u@h PRIVMSG #chan :hello there").unwrap();
        assert_eq!(l.command, "PRIVMSG");
        assert_eq!(l.params, vec!["#chan", "hello there"]);
        let l = parse("user alice 0 * :Alice Liddell").unwrap();
        assert_eq!(l.command, "USER");
        assert_eq!(l.params, vec!["alice", "0", "*", "Alice Liddell"]);
        assert_eq!(parse("PING").unwrap().params, Vec::<String>::new());
        assert_eq!(parse("JOIN  #a,#b").unwrap().params, vec!["#a,#b"]);
        assert!(parse("   ").is_none());
    }

    #[test]
    fn relayed_lines_are_single_and_bounded() {
        let m = StoredMessage {
            index: 7,
            to: "#r".into(),
            from: "alice".into(),
            id: "1".into(),
            text: format!("two\nlines {}", "x".repeat(2000)),
            ts_ms: 0,
            parties: Vec::new(),
        };
        let plain = privmsg(&m, false, false);
        let text = std::str::from_utf8(&plain).unwrap();
        assert!(text.starts_with(":alice!alice@raftchat PRIVMSG #r :two lines"));
        assert!(text.len() <= 512);
        assert_eq!(text.matches("\r\n").count(), 1);
        let tagged = privmsg(&m, true, false);
        assert!(
            std::str::from_utf8(&tagged)
                .unwrap()
                .starts_with("@time=1970-01-01T00:00:00.000Z;msgid=7 :alice!")
        );
    }
}
