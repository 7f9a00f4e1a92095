//! Rollout policies and the pure rollout planner.

use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

/// How many executions may be released per minute.
///
/// In JSON: `{"constant": {"perMinute": 600}}`, or `{"exponential":
/// {"basePerMinute": .., "incrementFactorPermille": .., "criterion":
/// {"notified": 100}, "maxPerMinute": ..}}` (the snake_case field names of
/// earlier versions are read too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum RateLimit {
    /// A fixed rate.
    Constant {
        /// Releases per minute.
        #[serde(alias = "per_minute")]
        per_minute: u32,
    },
    /// A rate that starts at `base_per_minute` and is multiplied by
    /// `increment_factor_permille / 1000` each time another `every`
    /// devices were notified (or succeeded), up to `max_per_minute`.
    Exponential {
        /// Starting rate.
        #[serde(alias = "base_per_minute")]
        base_per_minute: u32,
        /// Growth per step, in thousandths (2000 doubles).
        #[serde(alias = "increment_factor_permille")]
        increment_factor_permille: u32,
        /// What makes a step.
        criterion: RateIncrease,
        /// Cap.
        #[serde(alias = "max_per_minute")]
        max_per_minute: u32,
    },
}

/// What triggers a step of an exponential rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RateIncrease {
    /// Every this many released (notified) devices.
    Notified(u32),
    /// Every this many succeeded devices.
    Succeeded(u32),
}

/// What to do when a group reaches its success threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum GroupAction {
    /// Open the next group.
    NextGroup,
    /// Wait for an operator to approve the next group.
    Pause,
}

/// A count, or a percentage of a total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Threshold {
    /// At least this many.
    Count(u32),
    /// At least this percent.
    Percent(u8),
}

impl Threshold {
    fn reached(self, count: usize, total: usize) -> bool {
        match self {
            Self::Count(n) => count >= n as usize,
            Self::Percent(p) => total > 0 && count * 100 >= usize::from(p) * total,
        }
    }
}

/// A rollout group: the next `size` targets, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutGroup {
    /// How many targets.
    pub size: u32,
    /// Percent of the group that must succeed before `on_success`.
    pub success_percent: u8,
    /// Then what.
    pub on_success: GroupAction,
    /// Failures in the group that abort the rollout.
    pub error_threshold: Option<Threshold>,
}

/// Which failures an abort criterion counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailureType {
    /// FAILED.
    Failed,
    /// REJECTED.
    Rejected,
    /// TIMED_OUT.
    TimedOut,
    /// Any of them.
    All,
}

/// Abort when at least `threshold_percent` of the finished executions
/// failed this way, once at least `min_executed` have finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AbortCriterion {
    /// Which failures.
    pub failure: FailureType,
    /// Percent of finished executions.
    pub threshold_percent: u8,
    /// Finished executions before the criterion applies.
    pub min_executed: u32,
}

/// How often a failed or timed-out execution is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Retries after FAILED.
    pub failed: u8,
    /// Retries after TIMED_OUT.
    pub timed_out: u8,
}

/// A rollout's policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutPolicy {
    /// Release rate.
    pub rate: RateLimit,
    /// Groups, in order; targets past the last group form one more group
    /// (all targets are one group when this is empty).
    #[serde(default)]
    pub groups: Vec<RolloutGroup>,
    /// Abort criteria (none when absent).
    #[serde(default)]
    pub abort: Vec<AbortCriterion>,
    /// Retries (none when absent).
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Seconds an execution may stay IN_PROGRESS before the rollout times
    /// it out (for devices that never report).
    #[serde(default)]
    pub in_progress_timeout_secs: Option<u64>,
}

/// Where one target of a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TargetStatus {
    /// Not released yet.
    Pending,
    /// Released, waiting for the device.
    Queued,
    /// The device works on it.
    InProgress,
    /// Done.
    Succeeded,
    /// Failed.
    Failed,
    /// Timed out.
    TimedOut,
    /// Refused by the device.
    Rejected,
    /// Canceled (abort, operator).
    Canceled,
    /// Removed from the rollout.
    Removed,
}

impl TargetStatus {
    /// Whether this execution has finished.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Pending | Self::Queued | Self::InProgress)
    }

    fn counts_as(self, failure: FailureType) -> bool {
        match failure {
            FailureType::Failed => self == Self::Failed,
            FailureType::Rejected => self == Self::Rejected,
            FailureType::TimedOut => self == Self::TimedOut,
            FailureType::All => matches!(self, Self::Failed | Self::Rejected | Self::TimedOut),
        }
    }
}

/// One target as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// Where it is.
    pub status: TargetStatus,
    /// Executions so far (0 before the first release).
    pub attempts: u8,
    /// When it was last released (epoch seconds).
    pub released_at: Option<u64>,
    /// When its execution went IN_PROGRESS.
    pub started_at: Option<u64>,
}

impl Target {
    /// A target not yet released.
    pub const PENDING: Target = Target {
        status: TargetStatus::Pending,
        attempts: 0,
        released_at: None,
        started_at: None,
    };
}

/// The operator's and the planner's persisted decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutControl {
    /// Groups opened so far (at least the first).
    pub open_groups: u32,
    /// The operator paused the rollout.
    pub paused: bool,
    /// The rollout was aborted (by a criterion or an operator).
    pub aborted: bool,
}

/// Why a rollout stopped for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AbortReason {
    /// An abort criterion (its index in the policy) was met.
    Criterion(usize),
    /// A group's error threshold (the group's index) was reached.
    GroupErrors(u32),
    /// Aborted before (by this planner or an operator).
    Aborted,
}

/// Where the rollout is after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RolloutStatus {
    /// Releasing (or waiting for the rate limit or devices).
    Running,
    /// Paused by the operator.
    Paused,
    /// Group `0` finished (above its success threshold with a `Pause`
    /// action, or below it) and waits for an operator to open the next.
    AwaitingApproval(u32),
    /// Stopped: QUEUED executions are canceled, nothing more is released.
    Aborted(AbortReason),
    /// Every target finished.
    Completed,
}

/// What to do now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    /// Targets to release for the first time (indices).
    pub release: Vec<usize>,
    /// Targets to release again (retries).
    pub retry: Vec<usize>,
    /// IN_PROGRESS targets past the rollout's timeout: mark TIMED_OUT.
    pub time_out: Vec<usize>,
    /// Cancel every QUEUED execution (an abort).
    pub cancel_queued: bool,
    /// The control to persist.
    pub control: RolloutControl,
    /// The rollout's status.
    pub status: Option<RolloutStatus>,
    /// When to plan again at the latest (epoch seconds).
    pub wake_at: Option<u64>,
}

fn group_ranges(policy: &RolloutPolicy, n: usize) -> Vec<(usize, usize)> {
    let mut ranges = Vec::new();
    let mut at = 0usize;
    for g in &policy.groups {
        let end = (at + g.size as usize).min(n);
        ranges.push((at, end));
        at = end;
    }
    if at < n || ranges.is_empty() {
        ranges.push((at, n));
    }
    ranges
}

fn group_policy(policy: &RolloutPolicy, i: usize) -> RolloutGroup {
    policy.groups.get(i).copied().unwrap_or(RolloutGroup {
        size: u32::MAX,
        success_percent: 100,
        on_success: GroupAction::NextGroup,
        error_threshold: None,
    })
}

/// The rate allowed now.
pub fn current_rate(policy: &RolloutPolicy, targets: &[Target]) -> u32 {
    match policy.rate {
        RateLimit::Constant { per_minute } => per_minute,
        RateLimit::Exponential {
            base_per_minute,
            increment_factor_permille,
            criterion,
            max_per_minute,
        } => {
            let (count, every) = match criterion {
                RateIncrease::Notified(n) => (targets.iter().filter(|t| t.attempts > 0).count(), n),
                RateIncrease::Succeeded(n) => (
                    targets
                        .iter()
                        .filter(|t| t.status == TargetStatus::Succeeded)
                        .count(),
                    n,
                ),
            };
            let steps = count / (every.max(1) as usize);
            let mut rate = u64::from(base_per_minute);
            for _ in 0..steps {
                rate = rate * u64::from(increment_factor_permille) / 1000;
                if rate >= u64::from(max_per_minute) {
                    break;
                }
            }
            rate.min(u64::from(max_per_minute)) as u32
        }
    }
}

/// Decides what a rollout does at `now`, from its policy, its targets and
/// its persisted control. Pure: the same inputs give the same decision.
///
/// Order of rules: an aborted rollout stays aborted; abort criteria and
/// group error thresholds abort (cancel QUEUED, release nothing); stuck
/// IN_PROGRESS executions are timed out; a paused rollout releases nothing;
/// a group that reached its success threshold opens the next or waits for
/// approval; then retries and new releases from the open groups, in order,
/// never more than the rate allows in any 60-second window, nor more than
/// a sixtieth of it (at least one) in any one second.
///
/// `recent_releases` are the times (epoch seconds) of every release, first
/// or retry, in the last 60 seconds: the caller keeps this log with the
/// decisions it persists (a target's `released_at` alone would forget a
/// first release once it is retried).
pub fn plan(
    policy: &RolloutPolicy,
    targets: &[Target],
    control: RolloutControl,
    recent_releases: &[u64],
    now: u64,
) -> Decision {
    let ranges = group_ranges(policy, targets.len());
    // A stored control may name more groups than the policy has.
    let open_groups = (control.open_groups as usize).clamp(1, ranges.len()) as u32;
    let mut d = Decision {
        control: RolloutControl {
            open_groups,
            ..control
        },
        ..Decision::default()
    };
    if control.aborted {
        d.cancel_queued = true;
        d.status = Some(RolloutStatus::Aborted(AbortReason::Aborted));
        return d;
    }

    // Abort criteria over all finished executions.
    let finished = targets.iter().filter(|t| t.status.is_terminal()).count();
    for (i, c) in policy.abort.iter().enumerate() {
        let failures = targets
            .iter()
            .filter(|t| t.status.counts_as(c.failure))
            .count();
        if finished >= c.min_executed as usize
            && finished > 0
            && failures * 100 >= usize::from(c.threshold_percent) * finished
        {
            return aborted(d, AbortReason::Criterion(i));
        }
    }
    // Group error thresholds.
    for (g, &(start, end)) in ranges
        .iter()
        .enumerate()
        .take(d.control.open_groups as usize)
    {
        if let Some(t) = group_policy(policy, g).error_threshold {
            let failures = targets[start..end]
                .iter()
                .filter(|t| t.status.counts_as(FailureType::All))
                .count();
            if t.reached(failures, end - start) {
                return aborted(d, AbortReason::GroupErrors(g as u32));
            }
        }
    }

    // Stuck executions.
    let mut wake: Option<u64> = None;
    let mut wake_at = |t: u64| wake = Some(wake.map_or(t, |w| w.min(t)));
    if let Some(timeout) = policy.in_progress_timeout_secs {
        for (i, t) in targets.iter().enumerate() {
            if t.status == TargetStatus::InProgress {
                let due = t.started_at.unwrap_or(now).saturating_add(timeout);
                if due <= now {
                    d.time_out.push(i);
                } else {
                    wake_at(due);
                }
            }
        }
    }

    let retry_allowed = |t: &Target| match t.status {
        TargetStatus::Failed => t.attempts <= policy.retry.failed,
        TargetStatus::TimedOut => t.attempts <= policy.retry.timed_out,
        _ => false,
    };
    let finished = |t: &Target| t.status.is_terminal() && !retry_allowed(t);

    // Open groups whose predecessor succeeded enough. A group that finished
    // below its success threshold waits for an operator: the rollout is
    // never silently stuck.
    loop {
        let g = d.control.open_groups as usize - 1;
        if g + 1 >= ranges.len() {
            break;
        }
        let (start, end) = ranges[g];
        let gp = group_policy(policy, g);
        let succeeded = targets[start..end]
            .iter()
            .filter(|t| t.status == TargetStatus::Succeeded)
            .count();
        if !Threshold::Percent(gp.success_percent).reached(succeeded, end - start) && end > start {
            if targets[start..end].iter().all(finished) {
                d.status = Some(RolloutStatus::AwaitingApproval(g as u32));
            }
            break;
        }
        match gp.on_success {
            GroupAction::NextGroup => d.control.open_groups += 1,
            GroupAction::Pause => {
                d.status = Some(RolloutStatus::AwaitingApproval(g as u32));
                break;
            }
        }
    }

    let open_end = ranges[d.control.open_groups as usize - 1].1;
    let all_done = targets
        .iter()
        .all(|t| t.status.is_terminal() && !retry_allowed(t));
    if all_done && d.time_out.is_empty() {
        d.status = Some(RolloutStatus::Completed);
        d.wake_at = wake;
        return d;
    }
    if control.paused {
        d.status = Some(RolloutStatus::Paused);
        d.wake_at = wake;
        return d;
    }

    // Release within the rate: every release (first or retry) in the last
    // 60 seconds counts.
    let rate = current_rate(policy, targets) as usize;
    let window_start = now.saturating_sub(59);
    let recent: Vec<u64> = recent_releases
        .iter()
        .copied()
        .filter(|&r| r >= window_start && r <= now)
        .collect();
    // Spread over the minute: no more than a sixtieth of the rate (at least
    // one) in any one second, so a rollout of 3,000 a minute releases 50 a
    // second rather than 3,000 at once.
    let per_second = rate.div_ceil(60).max(1);
    let this_second = recent.iter().filter(|&&r| r == now).count();
    let mut budget = rate
        .saturating_sub(recent.len())
        .min(per_second.saturating_sub(this_second));
    let candidates = targets
        .iter()
        .enumerate()
        .filter(|(i, t)| (t.status == TargetStatus::Pending && *i < open_end) || retry_allowed(t));
    let mut blocked = false;
    for (i, t) in candidates {
        if budget == 0 {
            blocked = true;
            break;
        }
        budget -= 1;
        if t.status == TargetStatus::Pending {
            d.release.push(i);
        } else {
            d.retry.push(i);
        }
    }
    if blocked {
        let used = recent.len() + d.release.len() + d.retry.len();
        if used >= rate {
            // The minute is full: when its oldest release leaves it.
            wake_at(recent.iter().min().copied().unwrap_or(now) + 60);
        } else {
            wake_at(now + 1);
        }
    }
    d.status.get_or_insert(RolloutStatus::Running);
    d.wake_at = wake;
    d
}

fn aborted(mut d: Decision, reason: AbortReason) -> Decision {
    d.control.aborted = true;
    d.cancel_queued = true;
    d.status = Some(RolloutStatus::Aborted(reason));
    d
}
