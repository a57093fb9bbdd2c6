#!/usr/bin/env bash
# Deploys staging (fly.staging.toml, app `relay-staging`) to the staging regions, one
# machine per region, rolling, then smoke-tests every region. Same procedure and options
# as scripts/deploy.sh (both come from scripts/lib-deploy.sh); try `--dry-run` first.
set -euo pipefail
# shellcheck source=scripts/lib-deploy.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-deploy.sh"
relay_deploy staging "$@"
