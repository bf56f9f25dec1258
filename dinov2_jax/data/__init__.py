"""Input pipelines: DINOv2 multi-crop augmentation and batch collation."""
