"""Facts every module shares, defined once. Importing this module imports nothing else."""

SAMPLE_RATE = 16000  # Hz: what every AST checkpoint (and ASTFeatureExtractor) expects
FRAME_LENGTH = 400  # samples per spectrogram frame (25 ms)
HOP_LENGTH = 160  # samples between frames (10 ms)
FRAME_SECONDS = HOP_LENGTH / SAMPLE_RATE  # 0.01 s: one frame of model input per 10 ms
N_FFT = 512  # a frame zero-padded to the next power of two

# Feature normalization of the published checkpoints (preprocessor_config.json "mean" / "std").
AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974
AUDIOSET_MAX_LENGTH = 1024  # frames: 10.24 s
SPEECH_COMMANDS_MEAN = -6.845978
SPEECH_COMMANDS_STD = 5.5654526
SPEECH_COMMANDS_MAX_LENGTH = 128  # frames: 1.28 s

DEFAULT_MODEL = "MIT/ast-finetuned-audioset-10-10-0.4593"

# Calibrated thresholds: a label needs this many positive files in the data to get one. Below ~10 positives a
# precision of 0.9 cannot be told from 0.7 (the binomial standard error of 0.9 on 10 is ~0.1).
MIN_POSITIVES = 10

# int8 GEMM kernels (checkpoint.speed); AST_INT8_KERNEL picks one instead of the default (fbgemm where it works).
INT8_KERNELS = ("fbgemm", "onednn", "int_mm")
INT8_KERNEL_ENV = "AST_INT8_KERNEL"
