#!/bin/bash
# Installs inferd on an AMI being built (run as root on the build instance,
# from a checkout with a release binary built for this backend):
#   sudo deploy/install.sh [--backend cpu|cuda|neuron] [--binary PATH] [--model NAME]
# Puts the binary, the systemd unit (and the backend's drop-in), the
# settings and tenant config, the model, log rotation, and the CloudWatch
# agent's Prometheus scrape config in place, and enables the service. It
# does not start it: the AMI boots it.
set -euo pipefail

backend=cpu
binary=target/release/inferd
model=smollm2-135m-instruct
while [ $# -gt 0 ]; do
    case "$1" in
        --backend) backend="$2"; shift 2 ;;
        --binary) binary="$2"; shift 2 ;;
        --model) model="$2"; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
case "$backend" in cpu|cuda|neuron) ;; *) echo "backend must be cpu, cuda or neuron" >&2; exit 2 ;; esac
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
[ -x "$binary" ] || { echo "no executable at $binary: build it first (make build)" >&2; exit 1; }

# A dedicated user without a shell or home of its own.
id inferd >/dev/null 2>&1 || useradd --system --home-dir /var/lib/inferd --shell /usr/sbin/nologin inferd

install -m 0755 "$binary" /usr/local/bin/inferd
install -d -m 0755 /opt/inferd/models /etc/inferd
install -d -m 0750 -o inferd -g inferd /var/lib/inferd
install -d -m 0755 /var/log/inferd
install -m 0644 "$root/models/catalog.toml" "$root/models/fetch.py" /opt/inferd/models/

# Settings: keep an operator's edits on a re-run.
[ -f /etc/inferd/inferd.env ] || install -m 0640 -g inferd "$here/inferd.env" /etc/inferd/inferd.env
if [ ! -f /etc/inferd/inferd.toml ]; then
    printf '%s\n' '# Tenants and API keys: see README, "Tenants, limits and usage".' \
        '# With no [[tenants]] the API is open to anyone as tenant "default".' > /etc/inferd/inferd.toml
    chown root:inferd /etc/inferd/inferd.toml
    chmod 0640 /etc/inferd/inferd.toml
fi

# The model goes into the image: instances boot without fetching anything.
INFERD_MODELS_DIR=/opt/inferd/models python3 /opt/inferd/models/fetch.py --skip-others "$model"
sed -i "s/^INFERD_MODEL=.*/INFERD_MODEL=$model/" /etc/inferd/inferd.env

install -m 0644 "$here/systemd/inferd.service" /etc/systemd/system/inferd.service
install -d -m 0755 /etc/systemd/system/inferd.service.d
rm -f /etc/systemd/system/inferd.service.d/cuda.conf /etc/systemd/system/inferd.service.d/neuron.conf
if [ "$backend" != cpu ]; then
    install -m 0644 "$here/systemd/inferd.service.d-$backend/$backend.conf" /etc/systemd/system/inferd.service.d/
fi
if [ "$backend" = neuron ]; then
    # The step worker; the compiled model (neuron/compile.py's output) goes
    # into /opt/inferd/compiled, and INFERD_MODEL should name its Hugging
    # Face folder (config and tokenizer).
    install -d -m 0755 /opt/inferd/neuron /opt/inferd/compiled
    install -m 0644 "$here/../neuron/protocol.py" "$here/../neuron/worker.py" "$here/../neuron/compile.py" /opt/inferd/neuron/
fi

# Log rotation of the JSON log (the service appends; copytruncate keeps its fd valid).
cat > /etc/logrotate.d/inferd <<'ROTATE'
/var/log/inferd/inferd.log {
    daily
    rotate 14
    maxsize 500M
    compress
    delaycompress
    missingok
    notifempty
    copytruncate
}
ROTATE

# The CloudWatch agent scrapes /metrics and ships the log; its config is
# completed at boot with the Auto Scaling group's name (see the stack's user data).
install -d -m 0755 /opt/inferd/cloudwatch
install -m 0644 "$here/aws/cloudwatch-agent.json" "$here/aws/prometheus.yaml" /opt/inferd/cloudwatch/

systemctl daemon-reload
systemctl enable inferd.service
echo "inferd installed for $backend; it starts at boot (systemctl start inferd to try it now)"
