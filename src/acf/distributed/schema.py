"""The study attributes only a shared run uses (claims, locks, approvals, heartbeats) and the defaults of heartbeats
and waits. The results every run stores (config, spec, metadata, baseline, controls, one candidate record per
trial) are named in `acf.coordinator.run_store`: together they are the file format of a distributed run."""

# the trial attributes of proposals and closed trials, written by the lifecycle workers share with a single process
# (acf.coordinator.trial), are named with the other stored names
from acf.coordinator.run_store import T_DUPLICATE, T_PROPOSAL, T_RELEASED, T_STRATEGY  # noqa: F401

# study user attributes
A_BASELINE_CLAIM = "acf_baseline_claim"
A_COORDINATOR = "acf_coordinator"  # the coordinator lock {owner, token, heartbeat}
A_APPROVAL = "acf_approval"        # True: workers take only approved trials
A_STOP = "acf_stop"                # set to a reason: workers stop at their next episode boundary
# trial user attributes
T_WORKER = "acf_worker"            # who runs the trial
T_APPROVAL = "approval"            # pending | approved
HB_ATTR = "acf_heartbeat"          # journal heartbeat (trial system attribute)

DEFAULT_HEARTBEAT = 10
DEFAULT_GRACE = 30
DEFAULT_CONNECT_TIMEOUT = 5
DEFAULT_DB_WAIT = 120.0
