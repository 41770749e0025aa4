"""Training: the R-CNN fine-tuning sampler, losses, a generic train loop (DDP, AMP, exact resume).

- :mod:`.sampler`: label proposals by IoU intervals and draw R-CNN's 128-region mini-batches.
- :mod:`.losses`: cross-entropy over ``C + 1`` classes, auxiliary losses (0.3), smooth-L1 box regression.
- :mod:`.schedule`: warm-up, then step or cosine decay, as a function of the iteration.
- :mod:`.engine`: the generic loop (checkpoints, resume, metrics, curves); :mod:`.state`: the files it
  leaves (checksummed resume state, metrics log, curves); :mod:`.distributed`: torchrun.
- :mod:`.data`: warped, labelled region batches; :mod:`.validation`: periodic mAP; :mod:`.rcnn`: the
  detector's training run that ``tools/train_detector.py`` calls.
"""
