"""What users hand in: images (PNG, JPEG, TIFF), DICOM files, and sample images for demos."""
