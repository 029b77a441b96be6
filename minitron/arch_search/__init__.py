"""Minitron architecture search (docs/method.md section 3): :func:`search` and its parts.

- :mod:`.space`: the candidate grid (mixture-of-experts axes included) and exact parameter counts
  (:func:`enumerate_candidates`);
- :mod:`.config`: the search options (:class:`SearchConfig`);
- :mod:`.loop`: calibrate once, prune and measure every candidate, retrain the best (:func:`search`);
- :mod:`.report`: :class:`SearchResult`, the markdown table and the files.

Example:
    >>> result = minitron.search(model, calib_texts, train_texts, params=0.5, tokenizer=tok,
    ...                          config=minitron.SearchConfig(retrain_steps=200, top=8),
    ...                          eval_data=valid_texts, output_dir="out/search")
    >>> print(result.markdown())
    >>> result.model.save_pretrained("out/best")
"""

from .config import SearchConfig
from .loop import search
from .report import SearchResult, markdown_table, write_report
from .space import (ALL_AXES, AXES, AXIS_FIELDS, MOE_AXES, Candidate, ParamCounter, axis_values, default_divisors,
                    enumerate_candidates, model_axes)

__all__ = ["ALL_AXES", "AXES", "AXIS_FIELDS", "MOE_AXES", "Candidate", "ParamCounter", "SearchConfig", "SearchResult",
           "axis_values", "default_divisors", "enumerate_candidates", "markdown_table", "model_axes", "search",
           "write_report"]
