# The MLflow server image of docker-compose.yaml: MLflow at the version pyproject.toml pins (the
# compose file passes it; tests/unit/test_infra.py checks they agree) with its `auth` extra
# (Flask-WTF, for the basic-auth app), plus the Postgres driver and boto3 for the S3 artifact
# store, which the mlflow package alone does not install.
FROM python:3.11-slim-bookworm
ARG MLFLOW_VERSION
# /var/lib/mlflow-auth holds the user store; a new named volume mounted there takes its owner.
RUN test -n "$MLFLOW_VERSION" \
    && pip install --no-cache-dir "mlflow[auth]==${MLFLOW_VERSION}" psycopg2-binary==2.9.10 boto3==1.43.117 \
    && useradd --create-home --uid 1000 mlflow \
    && mkdir -p /var/lib/mlflow-auth && chown mlflow /var/lib/mlflow-auth
USER mlflow
