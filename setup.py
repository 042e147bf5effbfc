from setuptools import find_packages, setup

setup(
    name="ijepa-engine",
    version="0.1.0",
    description="Fast I-JEPA pretraining engine: Triton kernels, DeepSpeed ZeRO, DALI; exact to the reference",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.14.1", "torchvision==0.29.1", "triton==3.8.0", "numpy", "pyyaml", "pillow", "tqdm",
        "safetensors", "tensorboard", "matplotlib==3.11.2", "scikit-learn==1.9.1",
    ],
    extras_require={
        "distributed": ["deepspeed==0.19.8"],
        "dali": ["nvidia-dali-cuda130==2.4.0"],
        "xformers": ["xformers==0.0.35"],
        "interchange": ["transformers", "timm"],
    },
    entry_points={"console_scripts": ["ijepa=engine.cli:main"]},
)
