"""The study-attribute schema: every name a shared study stores, and the defaults of heartbeats and waits.

A study holds the whole search (config, spec summary, run metadata, baseline as study attributes; one candidate
record per trial), so these names are the file format of a distributed run."""

# study user attributes
A_CONFIG = "acf_config"            # RunConfig of the search (what every worker must run)
A_RUN_META = "acf_run_meta"        # RunMeta for the rebuilt frontier.json
A_SPEC = "acf_spec"                # model spec summary
A_STARTED = "acf_started_at"       # epoch seconds: the time budget counts from here
A_BASELINE = "acf_baseline"        # baseline Candidate record
A_BASELINE_CLAIM = "acf_baseline_claim"
A_COORDINATOR = "acf_coordinator"  # the coordinator lock {owner, token, heartbeat}
A_APPROVAL = "acf_approval"        # True: workers take only approved trials
A_STOP = "acf_stop"                # set to a reason: workers stop at their next episode boundary
A_STOPPED = "acf_stopped_because"
# trial user attributes
T_RECORD = "acf_record"            # the Candidate record (JSON)
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
