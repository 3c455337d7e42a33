"""KVzap: a learned per-layer predictor of KVzip+ scores (KVZIP.md, "Fast learned scorer").

    predictor    the predictor (linear | mlp), its safetensors store with metadata
    fit          ridge regression (closed form) and the 2-layer GELU MLP
    calibration  KVzip+ scores of calibration texts -> samples -> fitted predictors
    released     NVIDIA's released nvidia/KVzap-* checkpoints, from a local folder
    capture      forward pre-hooks on the attention modules (their input hidden states)

Method `kvzap` (service.compression.scorers.kvzap) applies a stored predictor inside the prefill.
"""
