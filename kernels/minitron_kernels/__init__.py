"""Triton kernels of minitron (installed as ``minitron_kernels``), each with its pure-PyTorch reference.

``fused_kl``: one chunk of the fused linear + KD loss (its reference and the rest of the op: ``minitron.losses.kd``).
``importance`` / ``importance_reference`` / ``importance_op``: activation and Block Importance accumulation
(kernels, reference, and the registered ops ``torch.ops.minitron.importance_accumulate_`` / ``block_cos_sum_``).
``aot_compile``: ahead-of-time compile check of every kernel for a GPU architecture.
"""
