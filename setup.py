from setuptools import find_packages, setup

setup(
    name="palm-rlhf",
    version="0.1.0",
    description="PaLM + RLHF (SFT, reward model from preferences, PPO) in PyTorch, with Triton attention kernels",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["palm_rlhf", "palm_rlhf.*"]),
    package_data={"palm_rlhf": ["static/*.html"]},                   # the labelling page
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "einops>=0.7", "beartype>=0.18", "accelerate>=0.30", "tqdm>=4.60",
                      "safetensors>=0.4"],
    entry_points={"console_scripts": ["palm-rlhf = palm_rlhf.cli:run"]},
    extras_require={
        "triton": ["triton>=3.2"],
        "plot": ["matplotlib>=3.7"],
        "sentiment": ["vaderSentiment>=3.3.2"],
        "label": ["starlette>=0.37", "uvicorn>=0.29"],
        "test": ["pytest>=7", "hypothesis>=6", "matplotlib>=3.7", "triton>=3.2", "vaderSentiment>=3.3.2",
                 "starlette>=0.37", "uvicorn>=0.29", "playwright>=1.40"],   # playwright drives Debian's chromium
    },
    license="MIT",
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
