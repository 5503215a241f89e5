# Where cockpit-agent lives on a host: sourced by install.sh and uninstall.sh, so that what one
# puts in place is exactly what the other removes. DESTDIR stages everything under a directory.
DESTDIR=${DESTDIR:-}
AGENT_USER=cockpit-agent
APP=/opt/cockpit-agent
CONF=/etc/cockpit-agent
STATE=/var/lib/cockpit-agent
UNIT=/etc/systemd/system/cockpit-agent.service
WRAPPER=/usr/local/bin/cockpit-agent
MANPAGE=/usr/local/share/man/man8/cockpit-agent.8
ENV_FILE=$CONF/agent.env

live() { [ -z "$DESTDIR" ]; }
say() { echo "==> $*"; }
