"""Active learning for atomforge: the campaign loop, campaign state on disk, the label journal
and the ``al`` CLI commands (registered through the commands hook, module
``atomforge.active_learning.commands``). Reaches plugins only through the registry, by name.
See ``docs/active_learning.md``.
"""

from ._campaign import Campaign, CampaignResult, LabellingHalted, OracleProbeFailed
from ._config import CampaignConfig, campaign_from_dict, load_campaign
from ._labelling import InlineExecutor, OracleCall, label_all, label_one, make_executor
from ._lock import CampaignLock, CampaignLocked, read_lock_holder
from ._loop import run_campaign
from ._store import JournalEntry, LabelJournal, LabelledSet, structure_hash, write_json_atomic
from ._workers import WorkerDied, WorkerPool
from .commands import campaign_status, export_campaign, final_model_path

__all__ = [
    "Campaign", "CampaignResult", "CampaignConfig", "campaign_from_dict", "load_campaign", "run_campaign",
    "InlineExecutor", "OracleCall", "label_all", "label_one", "make_executor", "WorkerPool", "WorkerDied",
    "CampaignLock", "CampaignLocked", "read_lock_holder", "OracleProbeFailed", "LabellingHalted",
    "JournalEntry", "LabelJournal", "LabelledSet", "structure_hash", "write_json_atomic",
    "campaign_status", "export_campaign", "final_model_path",
]
