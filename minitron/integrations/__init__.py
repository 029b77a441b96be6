"""Integrations with other training stacks (imported on demand; ``import minitron`` loads none of them).

* :mod:`minitron.integrations.hf`: :class:`~minitron.integrations.hf.KDTrainer`, a ``transformers.Trainer``
  that distills with the fused loss :class:`minitron.losses.LinearKDLoss`.
"""
