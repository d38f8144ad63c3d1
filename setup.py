from setuptools import find_packages, setup

setup(
    name="mmtrain",
    version="0.1.0",
    description="Distributed multi-GPU training for multimodal LLM research (VIKDF, Dynamic CoT, KDSL)",
    python_requires=">=3.10",
    packages=find_packages(
        include=["mmtrain", "mmtrain.*", "kernels", "kernels.*", "mmtrain_testing"]
    ),
    # Ranges admit both the CI stack (torch 2.13 / transformers 5.23 / triton 3.9) and the GPU
    # image (torch 2.11 / transformers 5.17 / triton 3.6); exact pins live in requirements/ci.txt.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=5.17,<6",
        "peft>=0.17",
        "webdataset>=0.2.100",
        "omegaconf>=2.3",
        "torchmetrics>=1.4",
        "tensorboard>=2.15",
        "triton>=3.0",
        "safetensors>=0.4",
        "pillow>=10",
        "numpy>=1.26",
        "tqdm>=4.66",
        "nltk>=3.8",  # Porter stemming for the keyphrase metrics
        "matplotlib>=3.7",  # labelled confusion-matrix figures (torchmetrics' plotting)
    ],
    extras_require={"test": ["pytest>=8"]},
    entry_points={"console_scripts": ["mmtrain=mmtrain.cli:main"]},
)
