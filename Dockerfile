# One image for the API and the worker. CUDA wheels of torch come from PyPI's default index;
# build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu for a CPU-only image.
FROM python:3.11-slim
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DATA_DIR=/data
WORKDIR /srv
RUN if [ -n "$TORCH_INDEX" ]; then pip install torch==$TORCH_VERSION --index-url $TORCH_INDEX; \
    else pip install torch==$TORCH_VERSION; fi
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
RUN pip install .
RUN useradd --create-home --uid 1000 prefixd && mkdir -p /data && chown prefixd /data
USER prefixd
EXPOSE 8000
CMD ["uvicorn", "app.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]
