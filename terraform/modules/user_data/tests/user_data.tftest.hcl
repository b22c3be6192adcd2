# Offline: this module has no provider. scripts/deploy-check.sh also runs the rendered
# instance-env script against a fake metadata service and checks the nft file with `nft -c`.

variables {
  role          = "node"
  binary_url    = "https://releases.chat.example/ringpost/1.0.0/ringpost-node"
  binary_sha256 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
  config_toml   = "data_dir = \"/var/lib/ringpost\"\n"
  region        = "eu-west-1"
  file_secrets = {
    "/etc/ringpost/cluster-secret"    = "/ringpost/cluster-secret"
    "/etc/ringpost/tls/fullchain.pem" = "/ringpost/tls/fullchain"
    "/etc/ringpost/tls/privkey.pem"   = "/ringpost/tls/privkey"
  }
  env_secrets = { RINGPOST_SMS_GATEWAY_TOKEN = "/ringpost/sms-token" }
}

run "node_carries_the_deploy_files_unchanged" {
  command = plan
  assert {
    condition     = startswith(output.cloud_config, "#cloud-config\n")
    error_message = "cloud-init needs the #cloud-config line first"
  }
  assert {
    condition = alltrue([for dest, source in {
      "/etc/systemd/system/ringpost-node.service"    = "ringpost-node.service"
      "/etc/systemd/system/ringpost-notrack.service" = "ringpost-notrack.service"
      "/etc/sysctl.d/90-ringpost.conf"               = "90-ringpost.conf"
    } : output.files[dest] == file("../../../deploy/${source}")])
    error_message = "the units and the sysctl file are deploy/'s, byte for byte"
  }
  assert {
    condition     = output.files["/etc/ringpost/node.toml"] == var.config_toml
    error_message = "node.toml is the rendered configuration"
  }
  assert {
    condition     = !contains(keys(output.files), "/etc/systemd/system/ringpost-coordinator.service")
    error_message = "a node gets no coordinator unit"
  }
  assert {
    condition     = strcontains(output.notrack_rules, "define RINGPOST_TCP_PORTS = { 443 }\n") && strcontains(output.notrack_rules, "define RINGPOST_UDP_PORTS = { 443 }\n")
    error_message = "the nft file names this deployment's client ports:\n${output.notrack_rules}"
  }
  assert {
    condition     = !contains(keys(output.files), "/etc/systemd/system/ringpost-node.service.d/20-io-uring.conf")
    error_message = "no io_uring drop-in by default: the unit's filter stays as deploy/ has it"
  }
}

run "io_uring_drop_in_only_when_asked" {
  command = plan
  variables {
    allow_io_uring = true
  }
  assert {
    condition     = strcontains(output.files["/etc/systemd/system/ringpost-node.service.d/20-io-uring.conf"], "\nSystemCallFilter=io_uring_setup io_uring_enter io_uring_register\n")
    error_message = "the drop-in adds io_uring's calls to the filter"
  }
}

run "install_checks_the_binary_and_reads_secrets_from_ssm" {
  command = plan
  assert {
    condition     = strcontains(output.install_script, "curl -fsSL --retry 5 --retry-delay 2 -o \"$tmp\" 'https://releases.chat.example/ringpost/1.0.0/ringpost-node'\necho \"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef  $tmp\" | sha256sum -c -\ninstall -m 0755 \"$tmp\" /usr/local/bin/ringpost-node\n")
    error_message = "download, sha256sum -c, then install:\n${output.install_script}"
  }
  assert {
    condition     = strcontains(output.install_script, "put_secret '/etc/ringpost/tls/privkey.pem' '/ringpost/tls/privkey'\n")
    error_message = "the TLS key comes from the parameter store"
  }
  assert {
    condition     = strcontains(output.install_script, "printf '%s=%s\\n' 'RINGPOST_SMS_GATEWAY_TOKEN' \"$(param '/ringpost/sms-token')\" >> /etc/ringpost/node.env.tmp\n")
    error_message = "the SMS token goes to node.env"
  }
  assert {
    condition     = !strcontains(output.cloud_config, "sekrit") && !strcontains(output.install_script, "mkfs")
    error_message = "no secret values and no volume formatting on a node"
  }
  assert {
    condition     = strcontains(output.install_script, "systemctl enable --now ringpost-notrack.service\nsystemctl enable --now ringpost-node.service\n")
    error_message = "the notrack rules, then the node"
  }
}

run "instance_env_follows_the_ports_and_the_advertise_template" {
  command = plan
  variables {
    ports          = { ws = 80, wss = 8443, quic = 4433 }
    advertise_host = "n-{public_ipv4_dashed}.nodes.chat.example"
  }
  assert {
    condition = alltrue([for line in [
      "host='n-{public_ipv4_dashed}.nodes.chat.example'\n",
      "echo \"RINGPOST_ADVERTISE_WS=ws://$host:80\"\n",
      "echo \"RINGPOST_ADVERTISE_WSS=wss://$host:8443\"\n",
      "echo \"RINGPOST_ADVERTISE_QUIC=$host:4433\"\n",
      "echo \"RINGPOST_LISTEN_PEER=$private_ipv4:7790\"\n",
    ] : strcontains(output.instance_env_script, line)])
    error_message = "instance-env.sh:\n${output.instance_env_script}"
  }
  assert {
    condition     = strcontains(output.notrack_rules, "define RINGPOST_TCP_PORTS = { 80, 8443 }\n") && strcontains(output.notrack_rules, "define RINGPOST_UDP_PORTS = { 4433 }\n")
    error_message = "notrack ports:\n${output.notrack_rules}"
  }
}

run "quic_only_has_no_tcp_notrack_rules" {
  command = plan
  variables {
    ports = { wss = 0, quic = 443 }
  }
  assert {
    condition     = !can(regex("(?m)^\\s*tcp ", output.notrack_rules)) && !can(regex("(?m)^define RINGPOST_TCP_PORTS", output.notrack_rules))
    error_message = "no TCP rules without TCP client ports:\n${output.notrack_rules}"
  }
  assert {
    condition     = !strcontains(output.instance_env_script, "ADVERTISE_WSS")
    error_message = "nothing advertised for wss"
  }
}

run "coordinator_mounts_its_volume_and_has_no_node_files" {
  command = plan
  variables {
    role           = "coordinator"
    binary_url     = "https://releases.chat.example/ringpost/1.0.0/ringpost-coordinator"
    config_toml    = "replica_id = 1\n"
    file_secrets   = { "/etc/ringpost/cluster-secret" = "/ringpost/cluster-secret" }
    data_volume_id = "vol-0abc123"
    allow_io_uring = true
  }
  assert {
    condition     = output.files["/etc/systemd/system/ringpost-coordinator.service"] == file("../../../deploy/ringpost-coordinator.service")
    error_message = "the coordinator unit is deploy/'s"
  }
  assert {
    condition     = output.files["/etc/ringpost/coord.toml"] == "replica_id = 1\n"
    error_message = "coord.toml"
  }
  assert {
    condition     = length(output.files) == 3
    error_message = "unit, coord.toml and install script only: ${jsonencode(keys(output.files))}"
  }
  assert {
    condition     = strcontains(output.install_script, "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0abc123") && strcontains(output.install_script, "/var/lib/ringpost-coordinator ext4 defaults,noatime,nofail 0 2")
    error_message = "the volume is found by its id and mounted at the data dir"
  }
  assert {
    condition     = !strcontains(output.install_script, "RINGPOST_SMS_GATEWAY_TOKEN") && !strcontains(output.install_script, "nft")
    error_message = "no node secrets or firewall on a coordinator"
  }
}

run "a_short_checksum_is_refused" {
  command = plan
  variables {
    binary_sha256 = "0123"
  }
  expect_failures = [var.binary_sha256]
}

run "a_plain_http_download_is_refused" {
  command = plan
  variables {
    binary_url = "http://releases.chat.example/ringpost-node"
  }
  expect_failures = [var.binary_url]
}

run "an_unknown_role_is_refused" {
  command = plan
  variables {
    role = "bench"
  }
  expect_failures = [var.role]
}

run "a_secret_variable_outside_ringpost_is_refused" {
  command = plan
  variables {
    env_secrets = { LD_PRELOAD = "/x" }
  }
  expect_failures = [var.env_secrets]
}

run "a_quote_in_a_parameter_name_is_refused" {
  command = plan
  variables {
    file_secrets = { "/etc/ringpost/cluster-secret" = "x'; rm -rf /; '" }
  }
  expect_failures = [var.file_secrets]
}
