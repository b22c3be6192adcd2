# Offline: this module has no provider. The rendered files are also parsed by the real
# binaries in scripts/deploy-check.sh (`--check-config`).

variables {
  coordinators = [
    { replica_id = 1, private_ip = "10.0.1.10" },
    { replica_id = 2, private_ip = "10.0.2.10" },
    { replica_id = 3, private_ip = "10.0.3.10" },
  ]
  sms_gateway_url = "https://sms.internal.example/v1/send"
}

run "node_toml_for_wss_and_quic" {
  command = plan
  assert {
    condition     = output.node_toml == <<-EOT
      # Rendered by terraform/modules/config; edit the Terraform variables, not this file.
      # Per-host values (node_id, zone, listen_admin, listen_peer, advertise_*) come from RINGPOST_* variables: instance.env on EC2.
      cluster_secret_file = "/etc/ringpost/cluster-secret"
      coordinator = "10.0.1.10:7401,10.0.2.10:7401,10.0.3.10:7401"
      data_dir = "/var/lib/ringpost"
      listen_quic = "0.0.0.0:443"
      listen_wss = "0.0.0.0:443"
      log_format = "json"
      replicate = true
      shard_count = 4096
      sms_gateway_url = "https://sms.internal.example/v1/send"
      tls_cert = "/etc/ringpost/tls/fullchain.pem"
      tls_key = "/etc/ringpost/tls/privkey.pem"
      ws_driver = "tokio"
      EOT
    error_message = "node.toml:\n${output.node_toml}"
  }
}

run "coord_toml_per_replica" {
  command = plan
  assert {
    condition     = length(output.coordinator_tomls) == 3
    error_message = "one file per replica"
  }
  assert {
    condition     = output.coordinator_tomls[1] == <<-EOT
      # Rendered by terraform/modules/config; edit the Terraform variables, not this file.
      admin_listen = "10.0.2.10:7402"
      client_listen = "10.0.2.10:7401"
      data_dir = "/var/lib/ringpost-coordinator"
      log_format = "json"
      raft_listen = "10.0.2.10:7400"
      replica_id = 2
      secret_file = "/etc/ringpost/cluster-secret"
      EOT
    error_message = "coord.toml of replica 2:\n${output.coordinator_tomls[1]}"
  }
}

run "coord_toml_admin_listen_follows_the_port" {
  command = plan
  variables {
    ports = { coordinator_admin = 9402 }
  }
  assert {
    condition     = alltrue([for i, t in output.coordinator_tomls : strcontains(t, "admin_listen = \"10.0.${i + 1}.10:9402\"\n")])
    error_message = "each replica's admin listener on its own private address:\n${join("\n", output.coordinator_tomls)}"
  }
}

run "coordinator_admin_port_on_the_raft_port_is_refused" {
  command = plan
  variables {
    ports = { coordinator_admin = 7400 }
  }
  expect_failures = [var.ports]
}

run "coordinator_admin_port_out_of_range_is_refused" {
  command = plan
  variables {
    ports = { coordinator_admin = 70000 }
  }
  expect_failures = [var.ports]
}

run "ws_driver_uring_for_the_ws_listener" {
  command = plan
  variables {
    ports     = { ws = 80 }
    ws_driver = "uring"
  }
  assert {
    condition     = strcontains(output.node_toml, "ws_driver = \"uring\"\n") && strcontains(output.node_toml, "listen_ws = \"0.0.0.0:80\"\n")
    error_message = "node.toml:\n${output.node_toml}"
  }
}

run "a_bad_ws_driver_is_refused" {
  command = plan
  variables {
    ports     = { ws = 80 }
    ws_driver = "epoll"
  }
  expect_failures = [var.ws_driver]
}

run "ws_driver_uring_without_a_ws_listener_is_refused" {
  command = plan
  variables {
    ws_driver = "uring"
  }
  expect_failures = [output.node_toml]
}

run "ws_only_test_cluster_with_media_in_s3" {
  command = plan
  variables {
    ports            = { ws = 80, wss = 0, quic = 0, media = 7781 }
    sms_gateway_url  = ""
    codes_to_log     = true
    media_public_url = "https://media.chat.example:8443"
    media_s3_bucket  = "rp-media-123"
    media_s3_region  = "eu-west-1"
    node_extra       = { device_rate = "500", push_webhook_token = "a \"quoted\" value" }
  }
  assert {
    condition     = !strcontains(output.node_toml, "tls_") && !strcontains(output.node_toml, "listen_wss")
    error_message = "no TLS files without wss and QUIC"
  }
  assert {
    condition = alltrue([for line in [
      "codes_to_log = true\n",
      "listen_ws = \"0.0.0.0:80\"\n",
      "listen_media = \"0.0.0.0:7781\"\n",
      "media_public_url = \"https://media.chat.example:8443\"\n",
      "media_store = \"s3\"\n",
      "media_s3_bucket = \"rp-media-123\"\n",
      "device_rate = \"500\"\n",
      "push_webhook_token = \"a \\\"quoted\\\" value\"\n",
    ] : strcontains(output.node_toml, line)])
    error_message = "node.toml:\n${output.node_toml}"
  }
  assert {
    condition     = output.tls_files.cert == "" && output.tls_files.key == ""
    error_message = "no TLS files"
  }
}

run "both_code_destinations_are_refused" {
  command = plan
  variables {
    codes_to_log = true
  }
  expect_failures = [var.sms_gateway_url]
}

run "no_code_destination_is_refused" {
  command = plan
  variables {
    sms_gateway_url = ""
  }
  expect_failures = [var.sms_gateway_url]
}

run "extra_keys_may_not_override_managed_ones" {
  command = plan
  variables {
    node_extra = { data_dir = "/tmp" }
  }
  expect_failures = [output.node_toml]
}

run "media_without_a_public_url_is_refused" {
  command = plan
  variables {
    ports = { media = 7781 }
  }
  expect_failures = [output.node_toml]
}

run "a_long_media_url_is_refused" {
  command = plan
  variables {
    ports            = { media = 7781 }
    media_public_url = "https://media.a-very-long-domain-name-for-the-media-service.chat.example:8443"
  }
  expect_failures = [var.media_public_url]
}

run "four_coordinators_are_refused" {
  command = plan
  variables {
    coordinators = [
      { replica_id = 1, private_ip = "10.0.1.10" },
      { replica_id = 2, private_ip = "10.0.2.10" },
      { replica_id = 3, private_ip = "10.0.3.10" },
      { replica_id = 4, private_ip = "10.0.1.11" },
    ]
  }
  expect_failures = [var.coordinators]
}
