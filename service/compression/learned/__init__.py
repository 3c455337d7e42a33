"""KVzap: a learned per-layer predictor of KVzip(+) scores (KVZIP.md, "Fast learned scorer").

    predictor    the predictor (linear | mlp), its safetensors store with metadata
    fit          ridge regression (closed form) and the 2-layer GELU MLP
    calibration  KVzip scores of calibration texts -> samples -> fitted predictors
    targets      rank-normal targets, and the rank metrics the fits are judged by
    released     NVIDIA's released nvidia/KVzap-* checkpoints, from a local folder

The attention inputs are read by forward pre-hooks (service.engine.attention_hook.
attention_inputs), the same ones the kvzip_plus scorer uses.

Method `kvzap` (service.compression.scorers.kvzap) applies a stored predictor inside the prefill.
"""
