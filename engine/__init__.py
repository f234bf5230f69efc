"""Training and evaluation as a library: ``engine.fit.fit``, ``engine.loop.train_one_epoch``,
``engine.evaluate.evaluate``, checkpoints, optimizer, EMA, AutoAnchor and the results writer.

Imports models/, data/ and utils/; never a script or study/ (see docs/architecture.md).
"""
