//! Where a VMM is in its guest's protection: every state of every role, named once, so
//! that `status` says the same thing in the same words whichever role answers.

/// The states, in the order a guest goes through them: a standalone guest, or a primary
/// that syncs, waits for its first acknowledgement, is protected, and may lose its
/// secondary; a secondary that receives, takes over, and then runs the guest itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Runs its guest with no secondary, and never had one.
    Standalone,
    /// A primary copying its guest to a new secondary (the initial sync).
    Syncing,
    /// A primary synced, waiting for its first checkpoint to be acknowledged.
    FirstCheckpoint,
    /// A primary whose secondary acknowledges its checkpoints.
    Protected,
    /// A primary that lost its secondary: the guest goes on unprotected.
    Unprotected,
    /// A primary that lost its secondary and claims the guest in the fence: output stays
    /// held (and the guest is paused after `--fence-timeout-ms`) until it wins.
    Fencing,
    /// A secondary waiting for a primary, or receiving its checkpoints.
    Receiving,
    /// A secondary whose primary was lost, building the guest from the last commit.
    TakingOver,
    /// Runs a guest it took over, unprotected until `ctl protect` gives it a secondary.
    TookOver,
}

impl Phase {
    /// The role `status` reports: who runs the guest, or who could.
    pub fn role(self) -> &'static str {
        match self {
            Phase::Standalone => "standalone",
            Phase::Receiving | Phase::TakingOver => "secondary",
            Phase::Syncing
            | Phase::FirstCheckpoint
            | Phase::Protected
            | Phase::Unprotected
            | Phase::Fencing
            | Phase::TookOver => "primary",
        }
    }

    /// The phase as `status` words it.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Standalone => "standalone",
            Phase::Syncing => "initial sync",
            Phase::FirstCheckpoint => "first checkpoint",
            Phase::Protected => "protected",
            Phase::Unprotected => "unprotected (secondary lost)",
            Phase::Fencing => "fencing (secondary lost, claiming the guest)",
            Phase::Receiving => "receiving",
            Phase::TakingOver => "taking over",
            Phase::TookOver => "took over, unprotected",
        }
    }

    /// Whether a secondary holds a checkpoint of the guest this VMM runs.
    pub fn guest_protected(self) -> bool {
        self == Phase::Protected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Phase; 9] = [
        Phase::Standalone,
        Phase::Syncing,
        Phase::FirstCheckpoint,
        Phase::Protected,
        Phase::Unprotected,
        Phase::Fencing,
        Phase::Receiving,
        Phase::TakingOver,
        Phase::TookOver,
    ];

    #[test]
    fn every_phase_has_its_own_name_and_only_a_protected_primary_is_protected() {
        let mut names: Vec<&str> = ALL.iter().map(|p| p.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
        for p in ALL {
            assert_eq!(p.guest_protected(), p == Phase::Protected, "{p:?}");
            assert!(
                ["standalone", "primary", "secondary"].contains(&p.role()),
                "{p:?}"
            );
        }
        assert_eq!(Phase::TookOver.role(), "primary");
        assert_eq!(Phase::TakingOver.role(), "secondary");
    }
}
