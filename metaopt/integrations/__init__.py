"""Bridges to other libraries; each submodule imports its optional dependency itself.

* :mod:`metaopt.integrations.higher` — importing it registers differentiable
  ``torch.optim.Adafactor`` (and transformers' ``Adafactor``) with ``higher``, so
  ``higher.innerloop_ctx`` accepts them; the maths is :class:`metaopt.optim.Adafactor`'s.

Nothing is imported here, so ``import metaopt`` never needs higher or transformers.
"""

__all__: list[str] = []
