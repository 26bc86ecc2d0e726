//! The guest's settings on the kernel command line, read by init:
//!
//! * `mcvmm.ip=A.B.C.D/PREFIX` — address of `eth0` (no address: the NIC stays down)
//! * `mcvmm.gw=A.B.C.D` — default route
//! * `mcvmm.port=N` — the agent's TCP port (default 7000)

use std::net::Ipv4Addr;

use crate::proto::DEFAULT_PORT;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    pub ip: Option<(Ipv4Addr, u8)>,
    pub gateway: Option<Ipv4Addr>,
    pub port: u16,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CmdlineError {
    #[error("{key}={value}: {why}")]
    Bad {
        key: &'static str,
        value: String,
        why: &'static str,
    },
}

impl GuestConfig {
    pub fn parse(cmdline: &str) -> Result<GuestConfig, CmdlineError> {
        let mut cfg = GuestConfig {
            ip: None,
            gateway: None,
            port: DEFAULT_PORT,
        };
        for word in cmdline.split_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let bad = |key, why| CmdlineError::Bad {
                key,
                value: value.to_string(),
                why,
            };
            match key {
                "mcvmm.ip" => {
                    let (addr, prefix) = value
                        .split_once('/')
                        .ok_or_else(|| bad("mcvmm.ip", "expected ADDRESS/PREFIX"))?;
                    let addr = addr
                        .parse()
                        .map_err(|_| bad("mcvmm.ip", "not an IPv4 address"))?;
                    let prefix = prefix
                        .parse()
                        .ok()
                        .filter(|p| (1..=32).contains(p))
                        .ok_or_else(|| bad("mcvmm.ip", "prefix must be 1 to 32"))?;
                    cfg.ip = Some((addr, prefix));
                }
                "mcvmm.gw" => {
                    cfg.gateway = Some(
                        value
                            .parse()
                            .map_err(|_| bad("mcvmm.gw", "not an IPv4 address"))?,
                    );
                }
                "mcvmm.port" => {
                    cfg.port = value
                        .parse()
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| bad("mcvmm.port", "not a port number"))?;
                }
                _ => {}
            }
        }
        Ok(cfg)
    }
}

/// The netmask of a prefix length (1..=32).
pub fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX << (32 - u32::from(prefix.clamp(1, 32))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_settings_among_kernel_words() {
        let cfg = GuestConfig::parse(
            "console=ttyS0 reboot=k mcvmm.ip=10.0.0.2/24 mcvmm.gw=10.0.0.1 mcvmm.port=7100 quiet",
        )
        .expect("valid");
        assert_eq!(cfg.ip, Some(("10.0.0.2".parse().expect("addr"), 24)));
        assert_eq!(cfg.gateway, Some("10.0.0.1".parse().expect("addr")));
        assert_eq!(cfg.port, 7100);
        assert_eq!(GuestConfig::parse("").expect("empty").port, DEFAULT_PORT);
    }

    #[test]
    fn bad_values_are_named() {
        for bad in [
            "mcvmm.ip=10.0.0.2",
            "mcvmm.ip=10.0.0/24",
            "mcvmm.ip=1.2.3.4/33",
            "mcvmm.port=0",
            "mcvmm.gw=x",
        ] {
            assert!(GuestConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn netmasks() {
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(netmask(1), Ipv4Addr::new(128, 0, 0, 0));
    }
}
