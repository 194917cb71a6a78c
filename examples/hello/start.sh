#!/bin/sh
# busybox httpd does not hand the container's environment to CGI scripts,
# so keep the variables the worker needs where the script can read them.
export -p | grep -E 'BERTH_|GREETING|PORT' > /tmp/worker-env.sh
exec httpd -f -p "${PORT:-8080}" -h /www
