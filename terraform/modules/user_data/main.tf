# Provider-free: the cloud-init user-data of a node or a coordinator. It carries the same
# units, sysctl and nft files as deploy/ (read with file(), so there is one copy), the
# rendered configuration, and an install script that fetches the binary (checked against its
# SHA-256) and the secrets (SSM parameter store), then starts the units.

terraform {
  required_version = ">= 1.9.0"
}

locals {
  deploy_dir  = var.deploy_dir != "" ? var.deploy_dir : "${path.module}/../../../deploy"
  node        = var.role == "node"
  binary      = "ringpost-${var.role}"
  config_file = local.node ? "node.toml" : "coord.toml"
  data_dir    = local.node ? "/var/lib/ringpost" : "/var/lib/ringpost-coordinator"

  # The nft file with the client ports of this deployment in its two `define` lines; a
  # protocol without client ports loses its rules (an empty set is not valid nft).
  notrack_source = file("${local.deploy_dir}/ringpost-notrack.nft")
  notrack_tcp    = [for p in [var.ports.ws, var.ports.wss, var.ports.media] : p if p > 0]
  notrack_udp    = [for p in [var.ports.quic] : p if p > 0]
  notrack_ports = replace(replace(local.notrack_source,
    "/define RINGPOST_TCP_PORTS = \\{[^}\n]*\\}/", "define RINGPOST_TCP_PORTS = { ${join(", ", local.notrack_tcp)} }"),
  "/define RINGPOST_UDP_PORTS = \\{[^}\n]*\\}/", "define RINGPOST_UDP_PORTS = { ${join(", ", local.notrack_udp)} }")
  notrack_rules = join("\n", [
    for line in split("\n", local.notrack_ports) :
    (length(local.notrack_tcp) == 0 && can(regex("^\\s*(define RINGPOST_TCP_PORTS|tcp [ds]port)", line))) ||
    (length(local.notrack_udp) == 0 && can(regex("^\\s*(define RINGPOST_UDP_PORTS|udp [ds]port)", line)))
    ? "# (no ${strcontains(line, "tcp") || strcontains(line, "TCP") ? "TCP" : "UDP"} client port) ${trimspace(line)}" : line
  ])

  instance_env = templatefile("${path.module}/templates/instance-env.sh.tftpl", {
    advertise_host = var.advertise_host
    ports          = var.ports
  })

  install = templatefile("${path.module}/templates/install.sh.tftpl", {
    role           = var.role
    binary         = local.binary
    binary_url     = var.binary_url
    binary_sha256  = var.binary_sha256
    region         = var.region
    file_secrets   = var.file_secrets
    env_secrets    = local.node ? var.env_secrets : {}
    config_file    = local.config_file
    data_volume_id = var.data_volume_id
    data_dir       = local.data_dir
  })

  files = concat(
    [
      { path = "/etc/systemd/system/${local.binary}.service", content = file("${local.deploy_dir}/${local.binary}.service"), permissions = "0644" },
      { path = "/etc/ringpost/${local.config_file}", content = var.config_toml, permissions = "0644" },
      { path = "/usr/local/lib/ringpost/install.sh", content = local.install, permissions = "0755" },
    ],
    local.node ? [
      { path = "/etc/sysctl.d/90-ringpost.conf", content = file("${local.deploy_dir}/90-ringpost.conf"), permissions = "0644" },
      { path = "/etc/ringpost/ringpost-notrack.nft", content = local.notrack_rules, permissions = "0644" },
      { path = "/etc/systemd/system/ringpost-notrack.service", content = file("${local.deploy_dir}/ringpost-notrack.service"), permissions = "0644" },
      { path = "/etc/systemd/system/ringpost-node.service.d/10-ec2.conf", content = file("${path.module}/templates/10-ec2.conf"), permissions = "0644" },
      { path = "/usr/local/lib/ringpost/instance-env.sh", content = local.instance_env, permissions = "0755" },
    ] : [],
    local.node && var.allow_io_uring ? [
      { path = "/etc/systemd/system/ringpost-node.service.d/20-io-uring.conf", content = file("${path.module}/templates/20-io-uring.conf"), permissions = "0644" },
    ] : [],
  )

  cloud_config_body = yamlencode({
    write_files = [for f in local.files : { path = f.path, content = f.content, permissions = f.permissions, owner = "root:root" }]
    runcmd      = [["/usr/local/lib/ringpost/install.sh"]]
  })
  cloud_config     = "#cloud-config\n${local.cloud_config_body}"
  user_data_base64 = base64gzip(local.cloud_config)
}
