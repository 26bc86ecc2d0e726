//! Which QEMU runs the test hosts. Two are set up (`scripts/setup.sh`): Debian 12's own
//! (7.2, `/usr/bin`) and the one of `bookworm-backports` (10.0), unpacked into the cache
//! beside it rather than installed over it, so that the reference VMM inside test hosts
//! stays Debian 12's whichever emulates the hosts. The lab uses [`CHOSEN`] unless
//! `MCVMM_LAB_EMULATOR` names another; `mcvmm-soak` compares them (docs/lab-notes.md).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The test hosts' emulator when nothing else is asked for: the one whose test hosts lost
/// fewer mcvmm guests under epochs (docs/lab-notes.md, "The soak").
pub const CHOSEN: Emulator = Emulator::Backports10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Emulator {
    /// Debian 12's `qemu-system-x86` (7.2).
    Debian72,
    /// `qemu-system-x86` from `bookworm-backports` (10.0), unpacked in the cache.
    Backports10,
}

#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error("MCVMM_LAB_EMULATOR={0:?}: the lab knows 7.2 (Debian 12's QEMU) and 10.0 (bookworm-backports)")]
    Unknown(String),
    #[error("QEMU {name} not found at {path}; scripts/setup.sh installs it")]
    Missing { name: &'static str, path: PathBuf },
}

impl Emulator {
    pub const ALL: [Emulator; 2] = [Emulator::Debian72, Emulator::Backports10];

    /// `MCVMM_LAB_EMULATOR` if set, else [`CHOSEN`].
    pub fn configured() -> Result<Emulator, EmulatorError> {
        match std::env::var("MCVMM_LAB_EMULATOR") {
            Ok(v) if !v.is_empty() => v.parse(),
            _ => Ok(CHOSEN),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Emulator::Debian72 => "7.2",
            Emulator::Backports10 => "10.0",
        }
    }

    /// Where the unpacked backports QEMU lives (`scripts/setup.sh` puts it there).
    fn unpacked_root() -> PathBuf {
        crate::assets::cache_dir().join("qemu-10.0")
    }

    /// The program to run and the arguments it needs before any other (its firmware
    /// folder, for the unpacked one); an error naming the fix when it is not installed.
    pub fn command(self) -> Result<(PathBuf, Vec<String>), EmulatorError> {
        let (path, args) = match self {
            Emulator::Debian72 => (PathBuf::from("/usr/bin/qemu-system-x86_64"), Vec::new()),
            Emulator::Backports10 => {
                let root = Self::unpacked_root();
                let data = root.join("usr/share/qemu").to_string_lossy().into_owned();
                (
                    root.join("usr/bin/qemu-system-x86_64"),
                    vec!["-L".to_string(), data],
                )
            }
        };
        if !path.is_file() {
            return Err(EmulatorError::Missing {
                name: self.name(),
                path,
            });
        }
        Ok((path, args))
    }
}

impl FromStr for Emulator {
    type Err = EmulatorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "7.2" | "debian" => Ok(Emulator::Debian72),
            "10.0" | "backports" => Ok(Emulator::Backports10),
            other => Err(EmulatorError::Unknown(other.to_string())),
        }
    }
}

impl fmt::Display for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QEMU {}", self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::Emulator;

    #[test]
    fn names_parse_back_and_unknown_ones_are_refused() {
        for e in Emulator::ALL {
            assert_eq!(e.name().parse::<Emulator>().ok(), Some(e));
        }
        let err = "9.1".parse::<Emulator>().expect_err("unknown").to_string();
        assert!(err.contains("7.2") && err.contains("10.0"), "{err}");
    }
}
