# The image of compose.yaml's api and workers: jobcast with its bundled tiny.en model.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
WORKDIR /srv/jobcast
COPY pyproject.toml README.md ./
COPY app app
COPY workers workers
COPY streams streams
COPY jobcast jobcast
RUN pip install --no-cache-dir .
ENV JOBCAST_DATA_DIR=/data
CMD ["jobcast", "api", "--host", "0.0.0.0", "--port", "8000"]
