"""Public prompt sets (GenEval, OCR, DrawBench, Pick-a-Pic): verified file loading, the GenEval generator, the sets."""
