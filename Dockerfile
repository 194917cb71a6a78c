# One image for every Berth service; docker-compose.yml picks the module.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY berth ./berth
COPY services ./services
RUN pip install --no-cache-dir .
ENV BERTH_HOST=0.0.0.0 PYTHONUNBUFFERED=1
ENTRYPOINT ["python", "-m"]
