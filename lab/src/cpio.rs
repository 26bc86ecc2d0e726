//! Writer of the "newc" cpio format the kernel unpacks as an initramfs.
//!
//! Several archives concatenated are one initramfs to the kernel, which is how the lab
//! puts a test's files on top of the cached base image without rebuilding it.

use std::collections::BTreeSet;
use std::io::{self, Write};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

pub struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
    written: u64,
    dirs: BTreeSet<String>,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            ino: 1,
            written: 0,
            dirs: BTreeSet::new(),
        }
    }

    fn entry(&mut self, path: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let name = path.trim_start_matches('/');
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.ino += 1;
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    /// Creates every missing parent directory of `path` (the kernel does not).
    fn parents(&mut self, path: &str) -> io::Result<()> {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            prefix.push('/');
            prefix.push_str(part);
            if self.dirs.insert(prefix.clone()) {
                let p = prefix.clone();
                self.entry(&p, S_IFDIR | 0o755, (0, 0), &[])?;
            }
        }
        Ok(())
    }

    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.parents(path)?;
        if self.dirs.insert(format!("/{}", path.trim_matches('/'))) {
            self.entry(path, S_IFDIR | perm, (0, 0), &[])?;
        }
        Ok(())
    }

    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.parents(path)?;
        self.entry(path, S_IFREG | perm, (0, 0), data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.parents(path)?;
        self.entry(path, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.parents(path)?;
        self.entry(path, S_IFCHR | perm, (major, minor), &[])
    }

    /// Writes the trailer and returns the sink.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_parents_created() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/a/b/c.txt", 0o644, b"hello").expect("file");
        w.symlink("/bin/sh", "busybox").expect("link");
        let out = w.finish().expect("finish");
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        for name in [
            "a\0",
            "a/b\0",
            "a/b/c.txt\0",
            "bin\0",
            "bin/sh\0",
            "TRAILER!!!\0",
        ] {
            assert!(text.contains(name), "{name:?} missing");
        }
        assert_eq!(text.matches("070701").count(), 6);
    }

    #[test]
    fn unpacks_with_the_cpio_tool() {
        let Ok(true) = std::process::Command::new("sh")
            .args(["-c", "command -v cpio >/dev/null"])
            .status()
            .map(|s| s.success())
        else {
            panic!("the cpio tool is needed for this test (Debian package cpio; scripts/setup.sh installs it)");
        };
        let dir = std::env::temp_dir().join(format!("mcvmm-cpio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let mut w = CpioWriter::new(Vec::new());
        w.file("/x/y", 0o600, b"data").expect("file");
        let archive = w.finish().expect("finish");
        let mut child = std::process::Command::new("cpio")
            .args(["-i", "-d", "--quiet"])
            .current_dir(&dir)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("cpio");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&archive)
            .expect("feed");
        assert!(child.wait().expect("wait").success());
        assert_eq!(std::fs::read(dir.join("x/y")).expect("unpacked"), b"data");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
