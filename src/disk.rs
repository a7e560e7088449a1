//! Opening the embedded stores (redb), the one way every store is opened.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use redb::Database;

/// Opens or creates the redb database at `path` with a page cache of `cache_bytes` (redb's
/// default is 1 GiB per database). A damaged file is an error naming the file, never a panic:
/// redb may panic on some truncated files, so the open is contained.
pub fn open_database(path: &Path, cache_bytes: usize) -> Result<Database, String> {
    let previous_hook = std::panic::take_hook();
    // Startup is single-threaded here; keep redb's panic message from reading like a crash.
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        Database::builder().set_cache_size(cache_bytes).create(path)
    }));
    std::panic::set_hook(previous_hook);
    match outcome {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(format!("{} is damaged or unreadable: {e}", path.display())),
        Err(panic) => {
            let detail = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown failure");
            Err(format!(
                "{} is damaged (truncated or corrupt): {detail}",
                path.display()
            ))
        }
    }
}
