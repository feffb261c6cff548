"""BlockSkim: Block-Skim extractive question answering for the Hugging Face stack."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="blockskim",
    version="0.1.0",
    description="Block-Skim (Guan et al., AAAI 2022): faster and more accurate extractive QA by skimming blocks",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The SQuAD metric script is an `evaluate` module loaded by path, so its folder ships as data of a package.
    packages=[
        *find_packages(include=["modeling_blockskim", "modeling_blockskim.*"]),
        "modeling_blockskim.metrics.squad_blockskim",
    ],
    include_package_data=True,
    package_data={"modeling_blockskim": ["py.typed", "model_card_template.md"]},
    install_requires=[
        # torch is pinned by the README's set-up commands (the local CPU build); any recent release works.
        "torch>=2.6",
        "transformers>=5.23,<6",
        "datasets>=4.0",
        "evaluate>=0.4.5",
        "huggingface-hub>=2.0",
        "safetensors>=0.4",
        # transformers' Trainer runs on accelerate.
        "accelerate>=1.0",
    ],
    extras_require={
        # PNG skim maps (the HTML report needs nothing extra).
        "viz": ["matplotlib>=3.7"],
        # olah serves the Hub API offline for the pull tests.
        "dev": ["pytest>=8", "ruff>=0.8", "olah>=0.5", "matplotlib>=3.7"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
