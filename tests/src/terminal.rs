//! A PTY on the laptop side with the CLI on it, for tests of what a person at a terminal
//! sees and types.

use std::io::{Read, Write};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::Home;

/// A PTY on the laptop side with the CLI on it; what it prints is collected.
pub struct Terminal {
    pub pty: pty_process::blocking::Pty,
    pub child: Child,
    seen: Arc<Mutex<String>>,
}

impl std::fmt::Debug for Terminal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminal")
            .field("pid", &self.child.id())
            .finish()
    }
}

impl Terminal {
    pub fn spawn(home: &Home, args: &[&str]) -> Self {
        let (pty, pts) = pty_process::blocking::open().expect("open a pty");
        pty.resize(pty_process::Size::new(24, 80)).expect("size");
        let cmd = home.cli();
        let mut command = pty_process::blocking::Command::new(cmd.get_program());
        for (key, value) in cmd.get_envs() {
            if let Some(value) = value {
                command = command.env(key, value);
            }
        }
        command = command
            .args(args)
            .env("TERM", "xterm-256color")
            .env("PS1", "$ ")
            .env_remove("PROMPT_COMMAND");
        let child = command.spawn(pts).expect("spawn the CLI on the pty");
        let seen = Arc::new(Mutex::new(String::new()));
        let mut reader = std::fs::File::from(
            std::os::fd::AsFd::as_fd(&pty)
                .try_clone_to_owned()
                .expect("a second descriptor of the pty"),
        );
        let sink = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .expect("seen")
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Terminal { pty, child, seen }
    }

    pub fn type_text(&mut self, text: &str) {
        self.pty.write_all(text.as_bytes()).expect("type");
        self.pty.flush().expect("flush");
    }

    /// Waits for `needle` to appear after `from` bytes of output; returns where it ends.
    pub fn expect(&self, from: usize, needle: &str, bound: Duration) -> usize {
        let deadline = Instant::now() + bound;
        loop {
            {
                let seen = self.seen.lock().expect("seen");
                if let Some(at) = seen.get(from..).and_then(|s| s.find(needle)) {
                    return from + at + needle.len();
                }
                assert!(
                    Instant::now() < deadline,
                    "no {needle:?} within {bound:?} in {:?}",
                    &seen[from.min(seen.len())..]
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything printed so far.
    pub fn seen(&self) -> String {
        self.seen.lock().expect("seen").clone()
    }

    /// How many bytes have been printed so far.
    pub fn printed(&self) -> usize {
        self.seen.lock().expect("seen").len()
    }
}
