# One image for every Berth service; docker-compose.yml picks the module.
# Installs from a wheelhouse built on the host (scripts/compose.sh), so the
# build needs no network.
FROM python:3.11-slim
COPY build/wheels /wheels
RUN python3 -m venv /opt/berth \
    && /opt/berth/bin/pip install --no-cache-dir --no-index --find-links /wheels berth \
    && rm -rf /wheels
ENV PATH=/opt/berth/bin:$PATH PYTHONUNBUFFERED=1
ENTRYPOINT ["python", "-m"]
