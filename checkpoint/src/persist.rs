//! How a device's state gets into a checkpoint and back: every device implements
//! [`Persist`], with its saved state a plain serde type next to the device. A checkpoint
//! holds each device's state as a [`DeviceState`]: a name, the version of its state type
//! and the state itself, so this crate never needs to know the devices' types, and a
//! device whose state type changes says so by its version instead of being misread.

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A device (or the VM's own state) that can be saved while paused and restored into a
/// fresh instance built with the same configuration, before the guest runs again.
///
/// No method has a default: a device that gains state must say how it is saved, rather
/// than being skipped without a word.
pub trait Persist {
    /// The saved state: plain data, versioned by [`Persist::STATE_VERSION`].
    type State: Serialize + DeserializeOwned + Send + 'static;
    type Error: std::error::Error + Send + Sync + 'static;
    /// Changes whenever [`Persist::State`] changes shape or meaning.
    const STATE_VERSION: u32;

    /// The state as of now (the guest paused).
    fn save(&mut self) -> Result<Self::State, Self::Error>;

    /// Continues from `state`. A state that does not fit this instance (another device,
    /// other queues) is refused, and the instance is left as it was where possible.
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error>;
}

/// One device's saved state as a checkpoint carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Which device this is (`serial`, `i8042`, `virtio-mmio.0`, ...).
    pub name: String,
    /// The [`Persist::STATE_VERSION`] it was saved with.
    pub version: u32,
    /// The device's [`Persist::State`] encoded on its own (bincode, see [`codec`]), so
    /// that the checkpoint carries any device's state without knowing its type. Encoded
    /// for every checkpoint: a compact binary codec, not a textual one.
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("saving {name}: {source}")]
    Save {
        name: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("restoring {name}: {source}")]
    Restore {
        name: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{name}: the checkpoint's state is version {found}, this mcvmm knows version {known}")]
    Version {
        name: String,
        found: u32,
        known: u32,
    },
    #[error("{name}: the checkpoint's state does not decode: {source}")]
    Decode {
        name: String,
        source: bincode::Error,
    },
    #[error("{name}: the checkpoint's state is {len} bytes, over the limit of {PART_LIMIT}")]
    TooLarge { name: String, len: usize },
    #[error("the checkpoint has state for {found} where {expected} was expected")]
    Name { expected: String, found: String },
    #[error("the checkpoint has no state for {0}")]
    Missing(String),
}

/// Largest state a part may decode to: devices keep registers and queue positions, not
/// data; a part claiming more came from a corrupt or hostile source.
const PART_LIMIT: u64 = 1 << 20;

/// The codec of a part's data: bincode, trailing bytes refused. The limit bounds what
/// is saved; a part read back is bounded by [`restore_part`]'s size check.
fn codec() -> impl Options {
    bincode::DefaultOptions::new()
        .with_limit(PART_LIMIT)
        .reject_trailing_bytes()
}

/// A device's state as saved in a pause, typed: encoding it into its [`DeviceState`]
/// waits until the guest runs again, as it costs more than the save itself.
pub trait Captured: Send {
    fn encode(self: Box<Self>) -> Result<DeviceState, PersistError>;
}

struct Typed<S> {
    name: String,
    version: u32,
    state: S,
}

impl<S: Serialize + Send> Captured for Typed<S> {
    fn encode(self: Box<Self>) -> Result<DeviceState, PersistError> {
        let data = codec()
            .serialize(&self.state)
            .map_err(|e| PersistError::Save {
                name: self.name.clone(),
                source: Box::new(e),
            })?;
        Ok(DeviceState {
            name: self.name,
            version: self.version,
            data,
        })
    }
}

/// Saves `device`, the part named `name`, to be encoded later.
pub fn capture_part<P: Persist>(
    name: &str,
    device: &mut P,
) -> Result<Box<dyn Captured>, PersistError> {
    let state = device.save().map_err(|e| PersistError::Save {
        name: name.to_string(),
        source: Box::new(e),
    })?;
    Ok(Box::new(Typed {
        name: name.to_string(),
        version: P::STATE_VERSION,
        state,
    }))
}

/// Saves `device` as the part named `name`.
pub fn save_part<P: Persist>(name: &str, device: &mut P) -> Result<DeviceState, PersistError> {
    capture_part(name, device)?.encode()
}

/// Restores `device`, named `name`, from `part`: refused, with `device` untouched, when
/// the part is another device's, of another version, or does not decode.
pub fn restore_part<P: Persist>(
    name: &str,
    device: &mut P,
    part: &DeviceState,
) -> Result<(), PersistError> {
    if part.name != name {
        return Err(PersistError::Name {
            expected: name.to_string(),
            found: part.name.clone(),
        });
    }
    if part.version != P::STATE_VERSION {
        return Err(PersistError::Version {
            name: name.to_string(),
            found: part.version,
            known: P::STATE_VERSION,
        });
    }
    // bincode bounds a decode from a slice by the slice alone, not by the codec's limit.
    if part.data.len() as u64 > PART_LIMIT {
        return Err(PersistError::TooLarge {
            name: name.to_string(),
            len: part.data.len(),
        });
    }
    let state: P::State = codec()
        .deserialize(&part.data)
        .map_err(|e| PersistError::Decode {
            name: name.to_string(),
            source: e,
        })?;
    device.restore(&state).map_err(|e| PersistError::Restore {
        name: name.to_string(),
        source: Box::new(e),
    })
}

/// A [`Persist`] device behind a trait object, so that a VM can keep its devices of
/// different types in one list and save or restore them in one loop.
pub trait Part {
    /// [`save_part`] of this device.
    fn save_as(&mut self, name: &str) -> Result<DeviceState, PersistError>;
    /// [`capture_part`] of this device.
    fn capture_as(&mut self, name: &str) -> Result<Box<dyn Captured>, PersistError>;
    /// [`restore_part`] of this device.
    fn restore_from(&mut self, name: &str, part: &DeviceState) -> Result<(), PersistError>;
}

impl<P: Persist> Part for P {
    fn save_as(&mut self, name: &str) -> Result<DeviceState, PersistError> {
        save_part(name, self)
    }

    fn capture_as(&mut self, name: &str) -> Result<Box<dyn Captured>, PersistError> {
        capture_part(name, self)
    }

    fn restore_from(&mut self, name: &str, part: &DeviceState) -> Result<(), PersistError> {
        restore_part(name, self, part)
    }
}

/// The part named `name` among `parts`.
pub fn find_part<'a>(
    parts: &'a [DeviceState],
    name: &str,
) -> Result<&'a DeviceState, PersistError> {
    parts
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| PersistError::Missing(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq)]
    struct Counter {
        count: u32,
        limit: u32,
    }

    #[derive(Serialize, Deserialize)]
    struct CounterState {
        count: u32,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("count {0} is over the limit")]
    struct OverLimit(u32);

    impl Persist for Counter {
        type State = CounterState;
        type Error = OverLimit;
        const STATE_VERSION: u32 = 1;
        fn save(&mut self) -> Result<CounterState, OverLimit> {
            Ok(CounterState { count: self.count })
        }
        fn restore(&mut self, s: &CounterState) -> Result<(), OverLimit> {
            if s.count > self.limit {
                return Err(OverLimit(s.count));
            }
            self.count = s.count;
            Ok(())
        }
    }

    fn counter(count: u32) -> Counter {
        Counter { count, limit: 10 }
    }

    #[test]
    fn a_part_restores_into_a_fresh_device() {
        let part = save_part("counter", &mut counter(7)).expect("save");
        let mut fresh = counter(0);
        restore_part("counter", &mut fresh, &part).expect("restore");
        assert_eq!(fresh, counter(7));
        assert_eq!(save_part("counter", &mut fresh).expect("save again"), part);
    }

    #[test]
    fn a_part_captured_now_and_encoded_later_is_the_state_of_its_capture() {
        let mut c = counter(7);
        let captured = c.capture_as("counter").expect("capture");
        c.count = 9;
        let part = captured.encode().expect("encode");
        assert_eq!(part, save_part("counter", &mut counter(7)).expect("save"));
        assert_ne!(part, save_part("counter", &mut c).expect("save now"));
    }

    #[test]
    fn another_devices_part_is_refused() {
        let part = save_part("counter", &mut counter(7)).expect("save");
        let mut fresh = counter(0);
        let e = restore_part("other", &mut fresh, &part).expect_err("another name");
        assert!(matches!(e, PersistError::Name { .. }), "{e}");
        assert_eq!(fresh, counter(0));
    }

    #[test]
    fn another_version_is_refused() {
        let mut part = save_part("counter", &mut counter(7)).expect("save");
        part.version = 2;
        let mut fresh = counter(0);
        let e = restore_part("counter", &mut fresh, &part).expect_err("version 2");
        assert!(e.to_string().contains("version 2"), "{e}");
        assert_eq!(fresh, counter(0));
    }

    #[test]
    fn state_that_does_not_decode_or_fit_is_refused() {
        let mut part = save_part("counter", &mut counter(7)).expect("save");
        part.data = vec![0xff];
        let mut fresh = counter(0);
        let e = restore_part("counter", &mut fresh, &part).expect_err("bad data");
        assert!(matches!(e, PersistError::Decode { .. }), "{e}");
        part.data = codec()
            .serialize(&CounterState { count: 11 })
            .expect("encode");
        let e = restore_part("counter", &mut fresh, &part).expect_err("over the limit");
        assert!(e.to_string().contains("over the limit"), "{e}");
        assert_eq!(fresh, counter(0));
    }

    #[test]
    fn trailing_bytes_after_a_state_are_refused() {
        let mut part = save_part("counter", &mut counter(7)).expect("save");
        part.data.push(0);
        let mut fresh = counter(0);
        let e = restore_part("counter", &mut fresh, &part).expect_err("trailing byte");
        assert!(matches!(e, PersistError::Decode { .. }), "{e}");
        assert_eq!(fresh, counter(0));
    }

    #[test]
    fn a_state_claiming_more_than_the_limit_is_refused_before_it_is_read() {
        #[derive(Default)]
        struct Blob(Vec<u8>);
        impl Persist for Blob {
            type State = Vec<u8>;
            type Error = std::convert::Infallible;
            const STATE_VERSION: u32 = 1;
            fn save(&mut self) -> Result<Vec<u8>, Self::Error> {
                Ok(self.0.clone())
            }
            fn restore(&mut self, s: &Vec<u8>) -> Result<(), Self::Error> {
                self.0 = s.clone();
                Ok(())
            }
        }
        // A length prefix of 2^40 bytes with nothing after it: refused, without an
        // allocation of that size.
        let mut data = vec![253u8];
        data.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let part = DeviceState {
            name: "blob".into(),
            version: 1,
            data,
        };
        let e = restore_part("blob", &mut Blob::default(), &part).expect_err("huge");
        assert!(matches!(e, PersistError::Decode { .. }), "{e}");
        // The same with the bytes there: refused by its size.
        let over = PART_LIMIT as usize + 1;
        let mut data = vec![253u8];
        data.extend_from_slice(&(over as u64).to_le_bytes());
        data.resize(data.len() + over, 0);
        let part = DeviceState { data, ..part };
        let e = restore_part("blob", &mut Blob::default(), &part).expect_err("over");
        assert!(matches!(e, PersistError::TooLarge { .. }), "{e}");
        // A state over the limit cannot be saved either: it would not restore.
        let e = save_part("blob", &mut Blob(vec![0; PART_LIMIT as usize + 1])).expect_err("big");
        assert!(matches!(e, PersistError::Save { .. }), "{e}");
    }

    #[test]
    fn parts_of_different_types_save_and_restore_in_one_loop() {
        #[derive(Default)]
        struct Flag(bool);
        impl Persist for Flag {
            type State = bool;
            type Error = std::convert::Infallible;
            const STATE_VERSION: u32 = 1;
            fn save(&mut self) -> Result<bool, Self::Error> {
                Ok(self.0)
            }
            fn restore(&mut self, s: &bool) -> Result<(), Self::Error> {
                self.0 = *s;
                Ok(())
            }
        }
        let mut live: Vec<(&str, Box<dyn Part>)> = vec![
            ("counter", Box::new(counter(3))),
            ("flag", Box::new(Flag(true))),
        ];
        let saved: Vec<DeviceState> = live
            .iter_mut()
            .map(|(name, d)| d.save_as(name).expect("save"))
            .collect();
        let mut fresh: Vec<(&str, Box<dyn Part>)> = vec![
            ("counter", Box::new(counter(0))),
            ("flag", Box::new(Flag(false))),
        ];
        for (name, d) in &mut fresh {
            d.restore_from(name, find_part(&saved, name).expect("part"))
                .expect("restore");
        }
        let again: Vec<DeviceState> = fresh
            .iter_mut()
            .map(|(name, d)| d.save_as(name).expect("save"))
            .collect();
        assert_eq!(again, saved);
    }

    #[test]
    fn a_missing_part_is_named() {
        let parts = vec![save_part("counter", &mut counter(1)).expect("save")];
        assert!(find_part(&parts, "counter").is_ok());
        let e = find_part(&parts, "serial").expect_err("missing");
        assert_eq!(e.to_string(), "the checkpoint has no state for serial");
    }
}
