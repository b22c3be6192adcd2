# Provider-free: the cluster's shape, computed from the variables and checked by their
# validation blocks. Names, the coordinators' fixed addresses and zones, the node group's
# size, the load balancer's listeners and the security group rules, for the AWS root module
# (terraform/) to create; `terraform test` checks all of it offline.

terraform {
  required_version = ">= 1.9.0"
}

locals {
  p = var.ports

  names = {
    nlb                 = "${var.name}-nlb"
    node_group          = "${var.name}-node"
    node_template       = "${var.name}-node"
    node_role           = "${var.name}-node"
    node_sg             = "${var.name}-node"
    coordinator_role    = "${var.name}-coordinator"
    coordinator_sg      = "${var.name}-coordinator"
    media_bucket_prefix = "${var.name}-media-"
  }

  # Replica i (id i+1) in subnet i mod n, at host number h + floor(i / n) of it.
  subnet_count = length(var.coordinator_subnets)
  coordinators = [
    for i in range(var.coordinator_count) : {
      replica_id = i + 1
      name       = "${var.name}-coordinator-${i + 1}"
      subnet_id  = var.coordinator_subnets[i % local.subnet_count].id
      az         = var.coordinator_subnets[i % local.subnet_count].az
      private_ip = cidrhost(var.coordinator_subnets[i % local.subnet_count].cidr, var.coordinator_host_number + floor(i / local.subnet_count))
    }
  ]
  coordinator_client_addresses = [for c in local.coordinators : "${c.private_ip}:${local.p.coordinator_client}"]

  # One load balancer listener per client port; wss and QUIC on the same number share one
  # TCP_UDP listener (an NLB cannot have a TCP and a UDP listener on one port).
  wss_quic_shared = local.p.wss > 0 && local.p.wss == local.p.quic
  listeners = merge(
    local.p.ws > 0 ? { ws = { protocol = "TCP", port = local.p.ws, target_port = local.p.ws, target_protocol = "TCP" } } : {},
    local.wss_quic_shared ? {
      wss_quic = { protocol = "TCP_UDP", port = local.p.wss, target_port = local.p.wss, target_protocol = "TCP_UDP" }
      } : merge(
      local.p.wss > 0 ? { wss = { protocol = "TCP", port = local.p.wss, target_port = local.p.wss, target_protocol = "TCP" } } : {},
      local.p.quic > 0 ? { quic = { protocol = "UDP", port = local.p.quic, target_port = local.p.quic, target_protocol = "UDP" } } : {},
    ),
    # Media: TLS ends at the load balancer (its certificate), plain HTTP to the node.
    local.p.media > 0 ? { media = { protocol = "TLS", port = local.p.media_public, target_port = local.p.media, target_protocol = "TCP" } } : {},
  )
  target_group_names = { for k, l in local.listeners : k => "${var.name}-${replace(lower(k), "_", "-")}-${l.target_port}" }

  # Security group rules. A source is a list of CIDR blocks or another group ("node",
  # "coordinator"). Client traffic keeps the client's address through the load balancer, so
  # client ports are opened to client_cidrs; health checks come from the load balancer's
  # addresses in the node subnets.
  client_tcp = [for p in [local.p.ws, local.p.wss, local.p.media] : p if p > 0]
  client_udp = [for p in [local.p.quic] : p if p > 0]
  node_ingress = merge(
    { for p in local.client_tcp : "client-tcp-${p}" => { protocol = "tcp", port = p, cidrs = var.client_cidrs, source_group = "", description = "clients (ws, wss, media) directly and through the load balancer" } },
    { for p in local.client_udp : "client-udp-${p}" => { protocol = "udp", port = p, cidrs = var.client_cidrs, source_group = "", description = "QUIC clients directly and through the load balancer" } },
    {
      "peer-udp-${local.p.peer}"    = { protocol = "udp", port = local.p.peer, cidrs = [], source_group = "node", description = "node-to-node QUIC peer links" }
      "admin-tcp-${local.p.admin}"  = { protocol = "tcp", port = local.p.admin, cidrs = var.admin_cidrs, source_group = "", description = "metrics and health from the operators' hosts" }
      "health-tcp-${local.p.admin}" = { protocol = "tcp", port = local.p.admin, cidrs = [for s in var.node_subnets : s.cidr], source_group = "", description = "load balancer health checks (GET /readyz) from its addresses in the node subnets" }
    },
  )
  coordinator_ingress = {
    "raft-tcp-${local.p.raft}"                       = { protocol = "tcp", port = local.p.raft, cidrs = [], source_group = "coordinator", description = "Raft between coordinator replicas" }
    "client-tcp-${local.p.coordinator_client}"       = { protocol = "tcp", port = local.p.coordinator_client, cidrs = [], source_group = "node", description = "nodes: join, heartbeat, watch" }
    "admin-client-tcp-${local.p.coordinator_client}" = { protocol = "tcp", port = local.p.coordinator_client, cidrs = var.admin_cidrs, source_group = "", description = "operators: ringpost-coordinator init and ctl" }
    # Like the nodes' admin port: admin_cidrs only (no load balancer checks coordinators).
    "admin-tcp-${local.p.coordinator_admin}" = { protocol = "tcp", port = local.p.coordinator_admin, cidrs = var.admin_cidrs, source_group = "", description = "metrics and health from the operators' hosts" }
  }
  # Nodes: all egress (clients' replies on untracked flows, S3, push providers, the SMS
  # gateway, peer links, coordinators, the binary download). Coordinators: each other, and
  # HTTPS for the binary download and the parameter store.
  coordinator_egress = {
    "raft-tcp-${local.p.raft}" = { protocol = "tcp", port = local.p.raft, cidrs = [], source_group = "coordinator", description = "Raft to the other replicas" }
    "https-tcp-443"            = { protocol = "tcp", port = 443, cidrs = ["0.0.0.0/0"], source_group = "", description = "HTTPS: the binary download and the SSM parameter store" }
  }

  # The rules as the AWS resources take them: one per (rule, CIDR) or (rule, source group).
  flat_rules = {
    for set, rules in { node_ingress = local.node_ingress, coordinator_ingress = local.coordinator_ingress, coordinator_egress = local.coordinator_egress } :
    set => { for x in flatten([
      for k, r in rules : concat(
        [for g in compact([r.source_group]) : { key = k, protocol = r.protocol, port = r.port, description = r.description, cidr = null, source_group = g }],
        [for c in r.cidrs : { key = "${k}-${c}", protocol = r.protocol, port = r.port, description = r.description, cidr = c, source_group = null }],
      )
    ]) : x.key => x }
  }

  init_command = join(" ", [
    "ringpost-coordinator init --secret-file /etc/ringpost/cluster-secret",
    "--shard-count ${var.shard_count} --replication-factor ${var.replication_factor}",
    "--coordinator ${join(",", local.coordinator_client_addresses)}",
  ])
}
