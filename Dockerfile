# The worker/dashboard/report image: CUDA PyTorch runtime + this project, run as a non-root user.
# Pinned base: PyTorch 2.5.1, CUDA 12.4, cuDNN 9, Python 3.11 (its torch/torchvision satisfy pyproject.toml,
# so pip keeps them).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAS_CACHE_DIR=/cache \
    TORCH_HOME=/weights \
    CUBLAS_WORKSPACE_CONFIG=:4096:8

WORKDIR /app

# Dependencies in their own layer, rebuilt only when pyproject.toml changes (not on every source edit).
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['s3']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY trainer ./trainer
COPY study ./study
RUN pip install --no-cache-dir --no-deps . \
    && useradd --create-home --uid 1000 app \
    && mkdir -p /cache /reports /weights /models \
    && chown app:app /cache /reports /models

USER 1000:1000
ENTRYPOINT ["python", "-m", "study"]
CMD ["--help"]
