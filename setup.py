"""Encoder pretraining system: RoBERTa, ELECTRA, DeBERTa and DeBERTaV3 on DeepSpeed + megatron-core."""
from setuptools import find_packages, setup

setup(
    name="encoder-pretrain",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(include=["trainer", "trainer.*", "models", "models.*", "data", "data.*", "tools", "tools.*"]),
    install_requires=[
        # torch first and pinned by the user's environment: on CPU machines `pip install torch==2.13.0`
        # picks the local CPU build; a bare requirement would pull a CUDA build.
        "torch>=2.4",
        "deepspeed>=0.16",
        "megatron-core>=0.12",
        "sentencepiece>=0.2.1",  # its fast numpy encode path
        "tokenizers>=0.20",
        "tensorboard>=2.15",
        "transformers>=4.45",
        "safetensors>=0.4",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "scikit-learn>=1.3",  # the bag-of-words baseline printed beside the demo's context task
        "matplotlib>=3.7",  # docs/ plots (tools/crossover.py)
    ],
    extras_require={
        "test": ["pytest>=8.0"],
        "zh": ["jieba>=0.42"],  # Chinese word boundaries: tools/preprocess_data.py --word-segmenter jieba
    },
)
