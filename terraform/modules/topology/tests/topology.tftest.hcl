# Offline: this module has no provider. `terraform test` plans it with good and bad inputs.

variables {
  name = "rp"
  coordinator_subnets = [
    { id = "subnet-a", cidr = "10.0.1.0/24", az = "eu-west-1a" },
    { id = "subnet-b", cidr = "10.0.2.0/24", az = "eu-west-1b" },
    { id = "subnet-c", cidr = "10.0.3.0/24", az = "eu-west-1c" },
  ]
  node_subnets = [
    { id = "subnet-pa", cidr = "10.0.101.0/24", az = "eu-west-1a" },
    { id = "subnet-pb", cidr = "10.0.102.0/24", az = "eu-west-1b" },
  ]
  admin_cidrs = ["10.0.200.0/24"]
}

run "three_coordinators_one_per_zone" {
  command = plan

  assert {
    condition     = [for c in output.coordinators : c.private_ip] == ["10.0.1.10", "10.0.2.10", "10.0.3.10"]
    error_message = "each replica gets host 10 of its own subnet"
  }
  assert {
    condition     = length(distinct([for c in output.coordinators : c.az])) == 3
    error_message = "three replicas in three zones"
  }
  assert {
    condition     = [for c in output.coordinators : c.replica_id] == [1, 2, 3]
    error_message = "replica ids start at 1"
  }
  assert {
    condition     = output.coordinator_client_addresses == ["10.0.1.10:7401", "10.0.2.10:7401", "10.0.3.10:7401"]
    error_message = "nodes connect to the coordinators' client port"
  }
  assert {
    condition     = output.init_command == "ringpost-coordinator init --secret-file /etc/ringpost/cluster-secret --shard-count 4096 --replication-factor 2 --coordinator 10.0.1.10:7401,10.0.2.10:7401,10.0.3.10:7401"
    error_message = "the init command names every replica: ${output.init_command}"
  }
}

run "five_coordinators_wrap_around_the_zones" {
  command = plan
  variables {
    coordinator_count = 5
  }
  assert {
    condition     = [for c in output.coordinators : c.private_ip] == ["10.0.1.10", "10.0.2.10", "10.0.3.10", "10.0.1.11", "10.0.2.11"]
    error_message = "the 4th and 5th replicas take the next address of the first two subnets"
  }
  assert {
    condition     = [for c in output.coordinators : c.az] == ["eu-west-1a", "eu-west-1b", "eu-west-1c", "eu-west-1a", "eu-west-1b"]
    error_message = "2/2/1 over three zones: losing any one zone keeps 3 of 5"
  }
}

run "wss_and_quic_share_one_tcp_udp_listener" {
  command = plan
  assert {
    condition     = jsonencode(output.listeners) == jsonencode({ wss_quic = { protocol = "TCP_UDP", port = 443, target_port = 443, target_protocol = "TCP_UDP" } })
    error_message = "one TCP_UDP listener on 443 by default"
  }
  assert {
    condition     = jsonencode(output.notrack_ports) == jsonencode({ tcp = [443], udp = [443] })
    error_message = "no conntrack on the client ports"
  }
}

run "separate_listeners_and_media" {
  command = plan
  variables {
    ports = { ws = 80, wss = 443, quic = 4433, media = 7781 }
  }
  assert {
    condition = jsonencode(output.listeners) == jsonencode({
      ws    = { protocol = "TCP", port = 80, target_port = 80, target_protocol = "TCP" }
      wss   = { protocol = "TCP", port = 443, target_port = 443, target_protocol = "TCP" }
      quic  = { protocol = "UDP", port = 4433, target_port = 4433, target_protocol = "UDP" }
      media = { protocol = "TLS", port = 8443, target_port = 7781, target_protocol = "TCP" }
    })
    error_message = "a listener per client port; media behind TLS on 8443"
  }
  assert {
    condition     = output.target_group_names == { ws = "rp-ws-80", wss = "rp-wss-443", quic = "rp-quic-4433", media = "rp-media-7781" }
    error_message = "target group names"
  }
  assert {
    condition     = jsonencode(output.notrack_ports) == jsonencode({ tcp = [80, 443, 7781], udp = [4433] })
    error_message = "notrack ports follow the listeners"
  }
}

run "security_groups_open_each_port_to_its_sources_only" {
  command = plan
  assert {
    condition     = jsonencode(output.node_ingress["client-tcp-443"].cidrs) == jsonencode(["0.0.0.0/0"]) && jsonencode(output.node_ingress["client-udp-443"].cidrs) == jsonencode(["0.0.0.0/0"])
    error_message = "client ports are public"
  }
  assert {
    condition     = output.node_ingress["peer-udp-7790"].source_group == "node" && jsonencode(output.node_ingress["peer-udp-7790"].cidrs) == jsonencode([])
    error_message = "peer links only between nodes"
  }
  assert {
    condition     = jsonencode(output.node_ingress["admin-tcp-7780"].cidrs) == jsonencode(["10.0.200.0/24"])
    error_message = "admin port only from admin_cidrs"
  }
  assert {
    condition     = jsonencode(output.node_ingress["health-tcp-7780"].cidrs) == jsonencode(["10.0.101.0/24", "10.0.102.0/24"])
    error_message = "health checks from the load balancer's subnets"
  }
  assert {
    condition     = length(output.node_ingress) == 5
    error_message = "nothing else is open on the nodes: ${jsonencode(keys(output.node_ingress))}"
  }
  assert {
    condition     = output.coordinator_ingress["raft-tcp-7400"].source_group == "coordinator" && jsonencode(output.coordinator_ingress["raft-tcp-7400"].cidrs) == jsonencode([])
    error_message = "raft only between coordinators"
  }
  assert {
    condition     = output.coordinator_ingress["client-tcp-7401"].source_group == "node" && jsonencode(output.coordinator_ingress["admin-client-tcp-7401"].cidrs) == jsonencode(["10.0.200.0/24"])
    error_message = "the coordinators' client port from nodes and admins"
  }
  assert {
    condition     = jsonencode(output.coordinator_ingress["admin-tcp-7402"].cidrs) == jsonencode(["10.0.200.0/24"]) && output.coordinator_ingress["admin-tcp-7402"].source_group == ""
    error_message = "the coordinators' admin port (metrics) only from admin_cidrs, as the nodes' is"
  }
  assert {
    condition     = jsonencode(output.coordinator_ingress["admin-tcp-7402"].cidrs) == jsonencode(output.node_ingress["admin-tcp-7780"].cidrs)
    error_message = "coordinators' and nodes' admin ports have the same sources"
  }
  assert {
    condition     = length(output.coordinator_ingress) == 4
    error_message = "nothing else is open on the coordinators: ${jsonencode(keys(output.coordinator_ingress))}"
  }
}

run "coordinator_admin_port_follows_ports" {
  command = plan
  variables {
    ports       = { coordinator_admin = 9402 }
    admin_cidrs = ["10.0.200.0/24", "10.9.0.0/16"]
  }
  assert {
    condition     = output.ports.coordinator_admin == 9402 && !contains(keys(output.coordinator_ingress), "admin-tcp-7402")
    error_message = "the rule moves with the port: ${jsonencode(keys(output.coordinator_ingress))}"
  }
  assert {
    condition     = jsonencode(output.coordinator_ingress["admin-tcp-9402"].cidrs) == jsonencode(["10.0.200.0/24", "10.9.0.0/16"])
    error_message = "every admin CIDR and nothing else"
  }
  assert {
    condition     = jsonencode([for k, r in output.security_group_rules.coordinator_ingress : r.cidr if r.port == 9402]) == jsonencode(["10.0.200.0/24", "10.9.0.0/16"])
    error_message = "one AWS rule per admin CIDR on 9402, none from a group"
  }
}

run "four_coordinators_are_refused" {
  command = plan
  variables {
    coordinator_count = 4
  }
  expect_failures = [var.coordinator_count]
}

run "one_coordinator_is_refused" {
  command = plan
  variables {
    coordinator_count = 1
  }
  expect_failures = [var.coordinator_count]
}

run "two_zones_for_coordinators_are_refused" {
  command = plan
  variables {
    coordinator_subnets = [
      { id = "subnet-a", cidr = "10.0.1.0/24", az = "eu-west-1a" },
      { id = "subnet-b", cidr = "10.0.2.0/24", az = "eu-west-1b" },
    ]
  }
  expect_failures = [var.coordinator_subnets]
}

run "two_subnets_in_one_zone_are_refused" {
  command = plan
  variables {
    coordinator_subnets = [
      { id = "subnet-a", cidr = "10.0.1.0/24", az = "eu-west-1a" },
      { id = "subnet-a2", cidr = "10.0.4.0/24", az = "eu-west-1a" },
      { id = "subnet-b", cidr = "10.0.2.0/24", az = "eu-west-1b" },
      { id = "subnet-c", cidr = "10.0.3.0/24", az = "eu-west-1c" },
    ]
  }
  expect_failures = [var.coordinator_subnets]
}

run "reserved_host_numbers_are_refused" {
  command = plan
  variables {
    coordinator_host_number = 2
  }
  expect_failures = [var.coordinator_host_number]
}

run "node_counts_out_of_order_are_refused" {
  command = plan
  variables {
    node_count = { min = 3, max = 2, desired = 3 }
  }
  expect_failures = [var.node_count]
}

run "replication_above_the_smallest_group_is_refused" {
  command = plan
  variables {
    node_count         = { min = 2, max = 4, desired = 2 }
    replication_factor = 3
  }
  expect_failures = [var.replication_factor]
}

run "replication_factor_four_is_refused" {
  command = plan
  variables {
    node_count         = { min = 4, max = 4, desired = 4 }
    replication_factor = 4
  }
  expect_failures = [var.replication_factor]
}

run "shard_count_beyond_u16_is_refused" {
  command = plan
  variables {
    shard_count = 65536
  }
  expect_failures = [var.shard_count]
}

run "admin_ports_open_to_the_internet_are_refused" {
  command = plan
  variables {
    admin_cidrs = ["0.0.0.0/0"]
  }
  expect_failures = [var.admin_cidrs]
}

run "colliding_ports_are_refused" {
  command = plan
  variables {
    ports = { ws = 7780 }
  }
  expect_failures = [var.ports]
}

run "coordinator_admin_port_colliding_with_raft_is_refused" {
  command = plan
  variables {
    ports = { coordinator_admin = 7400 }
  }
  expect_failures = [var.ports]
}

run "coordinator_admin_port_zero_is_refused" {
  command = plan
  variables {
    ports = { coordinator_admin = 0 }
  }
  expect_failures = [var.ports]
}

run "no_client_listener_is_refused" {
  command = plan
  variables {
    ports = { ws = 0, wss = 0, quic = 0 }
  }
  expect_failures = [var.ports]
}

run "long_names_are_refused" {
  command = plan
  variables {
    name = "ringpost-production-eu"
  }
  expect_failures = [var.name]
}

run "security_group_rules_one_per_source" {
  command = plan
  assert {
    condition = jsonencode(output.security_group_rules.node_ingress) == jsonencode({
      "admin-tcp-7780-10.0.200.0/24"  = { cidr = "10.0.200.0/24", description = "metrics and health from the operators' hosts", key = "admin-tcp-7780-10.0.200.0/24", port = 7780, protocol = "tcp", source_group = null }
      "client-tcp-443-0.0.0.0/0"      = { cidr = "0.0.0.0/0", description = "clients (ws, wss, media) directly and through the load balancer", key = "client-tcp-443-0.0.0.0/0", port = 443, protocol = "tcp", source_group = null }
      "client-udp-443-0.0.0.0/0"      = { cidr = "0.0.0.0/0", description = "QUIC clients directly and through the load balancer", key = "client-udp-443-0.0.0.0/0", port = 443, protocol = "udp", source_group = null }
      "health-tcp-7780-10.0.101.0/24" = { cidr = "10.0.101.0/24", description = "load balancer health checks (GET /readyz) from its addresses in the node subnets", key = "health-tcp-7780-10.0.101.0/24", port = 7780, protocol = "tcp", source_group = null }
      "health-tcp-7780-10.0.102.0/24" = { cidr = "10.0.102.0/24", description = "load balancer health checks (GET /readyz) from its addresses in the node subnets", key = "health-tcp-7780-10.0.102.0/24", port = 7780, protocol = "tcp", source_group = null }
      "peer-udp-7790"                 = { cidr = null, description = "node-to-node QUIC peer links", key = "peer-udp-7790", port = 7790, protocol = "udp", source_group = "node" }
    })
    error_message = "node rules: ${jsonencode(output.security_group_rules.node_ingress)}"
  }
  assert {
    condition     = jsonencode(keys(output.security_group_rules.coordinator_ingress)) == jsonencode(["admin-client-tcp-7401-10.0.200.0/24", "admin-tcp-7402-10.0.200.0/24", "client-tcp-7401", "raft-tcp-7400"])
    error_message = "coordinator rules: ${jsonencode(keys(output.security_group_rules.coordinator_ingress))}"
  }
  assert {
    condition     = output.security_group_rules.coordinator_ingress["raft-tcp-7400"].source_group == "coordinator" && output.security_group_rules.coordinator_egress["https-tcp-443-0.0.0.0/0"].cidr == "0.0.0.0/0"
    error_message = "raft from coordinators; HTTPS out"
  }
  assert {
    condition     = output.security_group_rules.coordinator_ingress["admin-tcp-7402-10.0.200.0/24"].cidr == "10.0.200.0/24" && output.security_group_rules.coordinator_ingress["admin-tcp-7402-10.0.200.0/24"].source_group == null && output.security_group_rules.coordinator_ingress["admin-tcp-7402-10.0.200.0/24"].port == 7402
    error_message = "the coordinators' admin port from admin_cidrs only"
  }
}
