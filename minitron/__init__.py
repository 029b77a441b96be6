"""minitron: Minitron-style structured pruning and distillation for Hugging Face causal LMs.

Example:
    >>> import minitron
    >>> small = minitron.prune(model, calib_texts, minitron.Target(hidden_size=3072, intermediate_size=9216))
    >>> small.save_pretrained("out/")

The verbs ``minitron.prune``, ``minitron.distill`` and ``minitron.search`` are functions; their
modules are named differently (``pruner``, ``distillation``, ``arch_search``) so that no function
shadows a subpackage (``import minitron.cli.distill`` works).
"""

from .data import load_text_blocks
from .models import load_model
from .distillation import DistillConfig, NonFiniteLossError, cache_teacher_logits, distill
from .evaluation import lm_loss, perplexity
from .importance.collect import ImportanceConfig, ImportanceScores, collect_importance
from .pruner import prune
from .streaming import prune_checkpoint
from .arch_search import SearchConfig, SearchResult, search
from .pruning import PruneConfig, PrunePlan, Target, apply_plan, make_plan, random_plan
from .pruning.params import count_parameters, target_parameters
from .pruning.sizing import target_for_budget

__version__ = "0.1.0"

__all__ = [
    "DistillConfig", "ImportanceConfig", "NonFiniteLossError", "cache_teacher_logits", "distill", "ImportanceScores", "PruneConfig", "PrunePlan", "Target", "apply_plan", "collect_importance",
    "count_parameters", "lm_loss", "load_model", "load_text_blocks", "make_plan", "perplexity", "prune", "prune_checkpoint", "random_plan", "search", "SearchConfig", "SearchResult",
    "target_for_budget", "target_parameters",
]
