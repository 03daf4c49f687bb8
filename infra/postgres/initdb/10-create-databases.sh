#!/bin/sh
# Runs once, when the Postgres data volume is first initialised (docker-entrypoint-initdb.d):
# one server, one database per service. The names are fixed because the connection URLs in
# docker-compose.yml name them; tests/test_infra.py checks that the two agree.
set -eu

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
SQL
