# Exactly the rules of modules/topology (tested there): client ports from client_cidrs, the
# peer port between nodes, Raft between coordinators, the coordinators' client port from
# nodes and admin_cidrs, the nodes' admin port from admin_cidrs and the load balancer's
# subnets, the coordinators' admin port from admin_cidrs.

resource "aws_security_group" "node" {
  name        = module.topology.names.node_sg
  description = "Ringpost nodes"
  vpc_id      = var.vpc_id
  tags        = { Name = module.topology.names.node_sg }
}

resource "aws_security_group" "coordinator" {
  name        = module.topology.names.coordinator_sg
  description = "Ringpost coordinators"
  vpc_id      = var.vpc_id
  tags        = { Name = module.topology.names.coordinator_sg }
}

locals {
  groups = { node = aws_security_group.node.id, coordinator = aws_security_group.coordinator.id }
  # One entry per (rule, CIDR) or (rule, source group): modules/topology's security_group_rules.
  rules = module.topology.security_group_rules
}

resource "aws_vpc_security_group_ingress_rule" "node" {
  for_each                     = local.rules.node_ingress
  security_group_id            = aws_security_group.node.id
  description                  = each.value.description
  ip_protocol                  = each.value.protocol
  from_port                    = each.value.port
  to_port                      = each.value.port
  cidr_ipv4                    = each.value.cidr
  referenced_security_group_id = each.value.source_group == null ? null : local.groups[each.value.source_group]
}

# Nodes: all egress. Clients' replies (with the client ports open to 0.0.0.0/0 this makes
# EC2 leave client connections untracked, which a host holding a million needs), S3, push
# providers, the SMS gateway, peers, coordinators, the binary download.
resource "aws_vpc_security_group_egress_rule" "node_all" {
  security_group_id = aws_security_group.node.id
  description       = "all egress: untracked client flows, S3, push, SMS gateway, peers, coordinators"
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_ingress_rule" "coordinator" {
  for_each                     = local.rules.coordinator_ingress
  security_group_id            = aws_security_group.coordinator.id
  description                  = each.value.description
  ip_protocol                  = each.value.protocol
  from_port                    = each.value.port
  to_port                      = each.value.port
  cidr_ipv4                    = each.value.cidr
  referenced_security_group_id = each.value.source_group == null ? null : local.groups[each.value.source_group]
}

resource "aws_vpc_security_group_egress_rule" "coordinator" {
  for_each                     = local.rules.coordinator_egress
  security_group_id            = aws_security_group.coordinator.id
  description                  = each.value.description
  ip_protocol                  = each.value.protocol
  from_port                    = each.value.port
  to_port                      = each.value.port
  cidr_ipv4                    = each.value.cidr
  referenced_security_group_id = each.value.source_group == null ? null : local.groups[each.value.source_group]
}
