//! Scratch folders for tests: one per test process under cargo's `target/tmp`, removed by the
//! next run. Included by path into every test crate of the workspace.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// `name` inside this test process's scratch folder.
pub fn scratch(name: &str) -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    let root = ROOT.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join(env!("CARGO_CRATE_NAME"));
        // A test binary has no hook after its last test, so each run removes the folders of
        // runs whose process has exited.
        #[cfg(target_os = "linux")]
        for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let exited = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
            if exited {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let root = base.join(std::process::id().to_string());
        std::fs::create_dir_all(&root).expect("creating the test scratch folder");
        root
    });
    root.join(name)
}
