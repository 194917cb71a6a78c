#!/bin/sh
. /tmp/worker-env.sh
echo "Content-Type: text/plain"
echo ""
echo "Hello from Berth!"
echo "project=$BERTH_PROJECT environment=$BERTH_ENVIRONMENT deployment=$BERTH_DEPLOYMENT_ID"
echo "greeting=${GREETING:-"(set one: berth secrets set --name GREETING)"}"
