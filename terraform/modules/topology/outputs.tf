output "names" {
  description = "Resource names, all prefixed with var.name."
  value       = local.names
}

output "coordinators" {
  description = "One object per replica: replica_id, name, subnet_id, az, private_ip."
  value       = local.coordinators
}

output "coordinator_client_addresses" {
  description = "The coordinators' client addresses (ip:port), what nodes and ctl connect to."
  value       = local.coordinator_client_addresses
}

output "node_count" {
  description = "The node group's min, max and desired size."
  value       = var.node_count
}

output "listeners" {
  description = "Load balancer listeners by name: protocol, port, target_port, target_protocol."
  value       = local.listeners
}

output "target_group_names" {
  description = "Target group name per listener."
  value       = local.target_group_names
}

output "node_ingress" {
  description = "Node security group ingress rules by name: protocol, port, cidrs or source_group (empty for none)."
  value       = local.node_ingress
}

output "coordinator_ingress" {
  description = "Coordinator security group ingress rules by name."
  value       = local.coordinator_ingress
}

output "security_group_rules" {
  description = "node_ingress, coordinator_ingress, coordinator_egress: one entry per (rule, CIDR) or (rule, source group), with protocol, port, description, cidr (or null) and source_group (or null)."
  value       = local.flat_rules
}

output "coordinator_egress" {
  description = "Coordinator security group egress rules by name (nodes have all egress)."
  value       = local.coordinator_egress
}

output "notrack_ports" {
  description = "Client ports exempt from connection tracking on the nodes: tcp and udp lists."
  value       = { tcp = local.client_tcp, udp = local.client_udp }
}

output "ports" {
  description = "The ports, defaults filled in."
  value       = local.p
}

output "init_command" {
  description = "Run once, from a host in admin_cidrs holding the secret, after the coordinators are up."
  value       = local.init_command
}
