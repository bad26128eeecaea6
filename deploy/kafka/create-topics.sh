#!/bin/sh
# Create each topic named on the command line, unless it exists: safe to run on every start.
# BOOTSTRAP_SERVERS and PARTITIONS come from docker-compose.yml (service kafka-init).
set -eu
: "${BOOTSTRAP_SERVERS:?set BOOTSTRAP_SERVERS}" "${PARTITIONS:?set PARTITIONS}"
for topic in "$@"; do
    /opt/kafka/bin/kafka-topics.sh --bootstrap-server "$BOOTSTRAP_SERVERS" \
        --create --if-not-exists --topic "$topic" \
        --partitions "$PARTITIONS" --replication-factor 1
done
/opt/kafka/bin/kafka-topics.sh --bootstrap-server "$BOOTSTRAP_SERVERS" --list
