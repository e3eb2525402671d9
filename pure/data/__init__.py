"""Training data: synthetic LQ/HQ pairs and their labels.

- `pure.data.degradations`: the Real-ESRGAN second-order degradation pipeline. Presets are YAML files
  under `recipes/degradations/`; every LQ image comes with the exact parameters that made it.
- `pure.data.labels`: blur and noise scores from those parameters, binned into the "Medium blur, small
  noise." text PURE's answers start with, and the interface for estimators that label real LQ images.
"""
