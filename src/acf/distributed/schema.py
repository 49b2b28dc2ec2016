"""The study attributes only a shared run uses (claims, locks, approvals, heartbeats) and the defaults of heartbeats
and waits. The results every run stores (config, spec, metadata, baseline, controls, one candidate record per
trial) are named in `acf.coordinator.run_store`: together they are the file format of a distributed run."""

# study user attributes
A_BASELINE_CLAIM = "acf_baseline_claim"
A_COORDINATOR = "acf_coordinator"  # the coordinator lock {owner, token, heartbeat}
A_APPROVAL = "acf_approval"        # True: workers take only approved trials
A_STOP = "acf_stop"                # set to a reason: workers stop at their next episode boundary
# trial user attributes
T_WORKER = "acf_worker"            # who runs the trial
T_APPROVAL = "approval"            # pending | approved
T_PROPOSAL = "acf_proposal"        # {strategy, proposed_by, describe, estimate} shown at approval
T_STRATEGY = "acf_strategy"        # an edited strategy that replaces the sampled one
T_RELEASED = "acf_released"        # why a trial was closed without an episode (budget, duplicate, approval moves)
T_DUPLICATE = "acf_duplicate_of"
HB_ATTR = "acf_heartbeat"          # journal heartbeat (trial system attribute)

DEFAULT_HEARTBEAT = 10
DEFAULT_GRACE = 30
DEFAULT_CONNECT_TIMEOUT = 5
DEFAULT_DB_WAIT = 120.0
