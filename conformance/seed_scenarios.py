"""The seed's scenarios, driven by the Azure SDK for Python against `kmsflow sandbox serve --tls`.

A client this project did not write, speaking to the sandbox as it would to Azure: managed
identity from the App Service endpoint, https with the sandbox's authority
(REQUESTS_CA_BUNDLE), Resource Manager at KMSFLOW_ARM_ENDPOINT, vaults on their own host
names. Nothing here adapts to the sandbox except name resolution: `*.sandbox.localhost` is sent
to loopback, as RFC 6761 resolvers do (glibc does not, and /etc/hosts has no wildcards).

Each check that fails raises; the process exits 1 with what differed. Run by
tests/conformance.rs.
"""

import base64
import json
import os
import socket
import sys
import time
import uuid

_getaddrinfo = socket.getaddrinfo


def _loopback_for_sandbox(host, *args, **kwargs):
    if isinstance(host, str) and host.lower().endswith(".sandbox.localhost"):
        host = "127.0.0.1"
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _loopback_for_sandbox

from azure.core.exceptions import HttpResponseError, ResourceNotFoundError  # noqa: E402
from azure.core.rest import HttpRequest  # noqa: E402
from azure.identity import ManagedIdentityCredential  # noqa: E402
from azure.keyvault.keys import KeyClient, KeyVaultKeyIdentifier  # noqa: E402
from azure.mgmt.authorization import AuthorizationManagementClient  # noqa: E402
from azure.mgmt.containerservice import ContainerServiceClient  # noqa: E402
from azure.mgmt.containerservice import models as aks  # noqa: E402
from azure.mgmt.keyvault import KeyVaultManagementClient  # noqa: E402
from azure.mgmt.keyvault import models as kv  # noqa: E402
from azure.mgmt.msi import ManagedServiceIdentityClient  # noqa: E402
from azure.mgmt.resource.features import FeatureClient  # noqa: E402
from azure.mgmt.resource.resources import ResourceManagementClient  # noqa: E402
from azure.mgmt.resource.subscriptions import SubscriptionClient  # noqa: E402

ARM = os.environ["KMSFLOW_ARM_ENDPOINT"]
SUBSCRIPTION = os.environ["AZURE_SUBSCRIPTION_ID"]
TENANT = os.environ["AZURE_TENANT_ID"]
LOCATION = "eastus"
GROUP = "rg-conformance"
# The seed's preview: what `az aks create --kms-infrastructure-encryption` sends.
AKS_PREVIEW = "2025-10-02-preview"

credential = ManagedIdentityCredential()
arm = {"base_url": ARM, "credential_scopes": ["https://management.azure.com/.default"], "polling_interval": 1}


def check(condition, what):
    if not condition:
        raise AssertionError(what)


def step(name):
    print(f"conformance: {name}", flush=True)


def until(what, probe, timeout=60):
    """Polls `probe` until it returns a truthy value, as az does while Azure converges."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout}s")
        time.sleep(0.5)


def retried(what, call, codes, timeout=60):
    """Calls `call`, again while Azure answers one of `codes` (RBAC and principals propagate)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except HttpResponseError as error:
            code = getattr(error.error, "code", None) if error.error else None
            text = str(error)
            if time.monotonic() < deadline and (code in codes or any(c in text for c in codes)):
                time.sleep(0.5)
                continue
            raise AssertionError(f"{what}: {error}") from error


def my_object_id():
    """What `az ad signed-in-user show --query id` gives: the token's `oid`."""
    token = credential.get_token("https://management.azure.com/.default").token
    payload = token.split(".")[1]
    payload += "=" * (-len(payload) % 4)
    return json.loads(base64.urlsafe_b64decode(payload))["oid"]


subscriptions = SubscriptionClient(credential, **arm)
resources = ResourceManagementClient(credential, SUBSCRIPTION, **arm)
features = FeatureClient(credential, SUBSCRIPTION, **arm)
vaults = KeyVaultManagementClient(credential, SUBSCRIPTION, **arm)
identities = ManagedServiceIdentityClient(credential, SUBSCRIPTION, **arm)
authorization = AuthorizationManagementClient(credential, SUBSCRIPTION, **arm)
clusters = ContainerServiceClient(credential, SUBSCRIPTION, **arm)


def login():
    step("az login --identity: subscriptions and tenants")
    listed = [s.subscription_id for s in subscriptions.subscriptions.list()]
    check(SUBSCRIPTION in listed, f"the subscription is listed: {listed}")
    check(subscriptions.subscriptions.get(SUBSCRIPTION).state == "Enabled", "the subscription is enabled")
    check(TENANT in [t.tenant_id for t in subscriptions.tenants.list()], "the tenant is listed")


def register():
    step("az feature register KMSPMKPreview, then az provider register")
    feature = features.features.register("Microsoft.ContainerService", "KMSPMKPreview")
    check(feature.properties.state in ("Registering", "Pending", "Registered"), f"feature state {feature.properties.state}")
    until(
        "the feature registers",
        lambda: features.features.get("Microsoft.ContainerService", "KMSPMKPreview").properties.state == "Registered",
    )
    provider = resources.providers.register("Microsoft.ContainerService")
    check(provider.registration_state in ("Registering", "Registered"), f"provider state {provider.registration_state}")
    until(
        "the provider registers",
        lambda: resources.providers.get("Microsoft.ContainerService").registration_state == "Registered",
    )


def group():
    step("az group create")
    created = resources.resource_groups.create_or_update(GROUP, {"location": LOCATION})
    check(created.properties.provisioning_state == "Succeeded", "the group is created")


def vault_with_key(name, private):
    step(f"az keyvault create {name} (RBAC), Crypto Officer for me by role name, key create")
    poller = vaults.vaults.begin_create_or_update(
        GROUP,
        name,
        kv.VaultCreateOrUpdateParameters(
            location=LOCATION,
            properties=kv.VaultProperties(
                tenant_id=TENANT,
                sku=kv.Sku(family="A", name="standard"),
                enable_rbac_authorization=True,
                public_network_access="Enabled",
                access_policies=[],
            ),
        ),
    )
    vault = poller.result()
    uri = vault.properties.vault_uri
    check(uri.startswith(f"https://{name}.vault.") and uri.endswith("/"), f"vaultUri has Key Vault's shape: {uri}")
    assign(vault.id, "Key Vault Crypto Officer", my_object_id(), "User")
    keys = KeyClient(uri, credential)
    key = retried("key create", lambda: keys.create_rsa_key("kms-key", size=2048), ["ForbiddenByRbac"])
    parsed = KeyVaultKeyIdentifier(key.id)
    check(parsed.vault_url == uri.rstrip("/"), f"the kid's vault is the vault: {key.id}")
    check(parsed.version, f"the kid is versioned: {key.id}")
    modulus = key.key.n
    check(isinstance(modulus, bytes) and len(modulus) == 256, "the key's n is a 2048-bit modulus")
    check(keys.get_key("kms-key").id == key.id, "the key reads back")
    if private:
        step(f"az keyvault update {name} --default-action Deny --bypass AzureServices")
        updated = vaults.vaults.update(
            GROUP,
            name,
            kv.VaultPatchParameters(
                properties=kv.VaultPatchProperties(
                    network_acls=kv.NetworkRuleSet(default_action="Deny", bypass="AzureServices")
                )
            ),
        )
        check(updated.properties.network_acls.default_action == "Deny", "the firewall denies by default")
        check(updated.properties.enable_rbac_authorization, "the update kept RBAC")
    return vault, f"{uri}keys/kms-key"


def assign(scope, role_name, principal, principal_type):
    definitions = list(authorization.role_definitions.list(scope, filter=f"roleName eq '{role_name}'"))
    check(len(definitions) == 1, f"one definition named {role_name}: {[d.role_name for d in definitions]}")
    retried(
        f"assign {role_name}",
        lambda: authorization.role_assignments.create(
            scope,
            str(uuid.uuid4()),
            {"role_definition_id": definitions[0].id, "principal_id": principal, "principal_type": principal_type},
        ),
        ["PrincipalNotFound"],
    )


def identity_for(vault, name):
    step(f"az identity create {name}, Crypto User and Key Vault Contributor on the vault")
    created = identities.user_assigned_identities.create_or_update(GROUP, name, {"location": LOCATION})
    check(created.principal_id and created.client_id, "the identity has a principal")
    assign(vault.id, "Key Vault Crypto User", created.principal_id, "ServicePrincipal")
    assign(vault.id, "Key Vault Contributor", created.principal_id, "ServicePrincipal")
    return created


def security(kms_key=None, vault=None, access=None):
    profile = aks.ManagedClusterSecurityProfile(
        kubernetes_resource_object_encryption_profile=aks.KubernetesResourceObjectEncryptionProfile(
            infrastructure_encryption="Enabled"
        )
    )
    if kms_key:
        profile.azure_key_vault_kms = aks.AzureKeyVaultKms(
            enabled=True, key_id=kms_key, key_vault_network_access=access, key_vault_resource_id=vault.id
        )
    return profile


def cluster_body(name, profile, identity=None):
    body = aks.ManagedCluster(
        location=LOCATION,
        dns_prefix=name,
        kubernetes_version="1.33.0",
        agent_pool_profiles=[
            aks.ManagedClusterAgentPoolProfile(name="nodepool1", mode="System", count=1, vm_size="Standard_DS2_v2")
        ],
        security_profile=profile,
    )
    if identity is not None:
        body.identity = aks.ManagedClusterIdentity(
            type="UserAssigned", user_assigned_identities={identity.id: aks.ManagedServiceIdentityUserAssignedIdentitiesValue()}
        )
    else:
        body.identity = aks.ManagedClusterIdentity(type="SystemAssigned")
    return body


def put_cluster(name, body):
    """`az aks create/update`: the PUT, then Azure-AsyncOperation polled to its end; a grant
    still propagating fails the operation, and az's user runs it again."""
    return retried(
        f"cluster {name}",
        lambda: clusters.managed_clusters.begin_create_or_update(GROUP, name, body).result(),
        ["AzureKeyVaultKmsValidateIdentityPermissionCustomerError"],
    )


def update_cluster(name, change):
    """`az aks update`: GET, change, PUT the whole body back."""
    current = clusters.managed_clusters.get(GROUP, name)
    check(current.identity_profile and "kubeletidentity" in current.identity_profile, "the cluster has a kubelet identity")
    change(current)
    return put_cluster(name, current)


def shown_security_profile(name):
    """`az aks show --query securityProfile`, in the seed's preview api-version."""
    response = clusters._client.send_request(
        HttpRequest(
            "GET",
            f"{ARM}/subscriptions/{SUBSCRIPTION}/resourceGroups/{GROUP}/providers/Microsoft.ContainerService/managedClusters/{name}",
            params={"api-version": AKS_PREVIEW},
        )
    )
    response.raise_for_status()
    return {k: v for k, v in response.json()["properties"]["securityProfile"].items() if v is not None}


def expect_profile(name, kms):
    expected = {"kubernetesResourceObjectEncryptionProfile": {"infrastructureEncryption": "Enabled"}}
    if kms:
        expected["azureKeyVaultKms"] = kms
    shown = shown_security_profile(name)
    check(shown == expected, f"{name}: securityProfile as the seed shows it:\n  shown    {shown}\n  expected {expected}")


def pmk_new():
    step("az aks create --kms-infrastructure-encryption Enabled (PMK, new cluster)")
    put_cluster("aks-pmk", cluster_body("aks-pmk", security()))
    expect_profile("aks-pmk", None)


def pmk_existing():
    step("az aks update --kms-infrastructure-encryption Enabled (PMK, existing cluster)")
    put_cluster("aks-existing", cluster_body("aks-existing", aks.ManagedClusterSecurityProfile()))

    def enable(cluster):
        cluster.security_profile.kubernetes_resource_object_encryption_profile = (
            aks.KubernetesResourceObjectEncryptionProfile(infrastructure_encryption="Enabled")
        )

    update_cluster("aks-existing", enable)
    expect_profile("aks-existing", None)


def cmk_new(access, vault, key, identity):
    name = f"aks-cmk-{access.lower()}"
    step(f"az aks create --enable-azure-keyvault-kms ... --azure-keyvault-kms-key-vault-network-access {access}")
    put_cluster(name, cluster_body(name, security(key, vault, access), identity))
    expect_profile(
        name,
        {"enabled": True, "keyId": key, "keyVaultNetworkAccess": access, "keyVaultResourceId": vault.id},
    )


def migrations(vault, key, identity):
    step("migrate PMK to CMK: az aks update --enable-azure-keyvault-kms ... Public --assign-identity")

    def to_cmk(cluster):
        cluster.identity = aks.ManagedClusterIdentity(
            type="UserAssigned", user_assigned_identities={identity.id: aks.ManagedServiceIdentityUserAssignedIdentitiesValue()}
        )
        cluster.security_profile.azure_key_vault_kms = aks.AzureKeyVaultKms(
            enabled=True, key_id=key, key_vault_network_access="Public", key_vault_resource_id=vault.id
        )

    update_cluster("aks-pmk", to_cmk)
    expect_profile(
        "aks-pmk", {"enabled": True, "keyId": key, "keyVaultNetworkAccess": "Public", "keyVaultResourceId": vault.id}
    )
    step("migrate CMK to PMK: az aks update --kms-infrastructure-encryption Enabled --disable-azure-keyvault-kms")

    def to_pmk(cluster):
        cluster.security_profile.azure_key_vault_kms = aks.AzureKeyVaultKms(enabled=False)

    update_cluster("aks-pmk", to_pmk)
    shown = shown_security_profile("aks-pmk")
    check(shown["kubernetesResourceObjectEncryptionProfile"] == {"infrastructureEncryption": "Enabled"}, f"PMK stays: {shown}")
    check(shown.get("azureKeyVaultKms", {}).get("enabled") is not True, f"CMK is off: {shown}")


def refusals():
    step("what Azure refuses: an unknown api-version, a missing vault")
    try:
        clusters._client.send_request(
            HttpRequest("GET", f"{ARM}/subscriptions/{SUBSCRIPTION}/resourceGroups/{GROUP}", params={"api-version": "2099-01-01"})
        ).raise_for_status()
        raise AssertionError("an unknown api-version was accepted")
    except HttpResponseError as error:
        check(error.status_code == 400 and "InvalidApiVersionParameter" in str(error), f"unknown api-version: {error}")
    try:
        vaults.vaults.get(GROUP, "kv-missing")
        raise AssertionError("a missing vault was found")
    except ResourceNotFoundError:
        pass


def main():
    login()
    register()
    group()
    public_vault, public_key = vault_with_key("kv-conf-public", private=False)
    private_vault, private_key = vault_with_key("kv-conf-private", private=True)
    public_identity = identity_for(public_vault, "id-conf-public")
    private_identity = identity_for(private_vault, "id-conf-private")
    pmk_new()
    pmk_existing()
    cmk_new("Public", public_vault, public_key, public_identity)
    # The key id as the seed writes it, `https://{vault}.vault.<suffix>/keys/{name}`: no port.
    host = private_vault.properties.vault_uri.split("//", 1)[1].split(":", 1)[0]
    cmk_new("Private", private_vault, f"https://{host}/keys/kms-key", private_identity)
    migrations(public_vault, public_key, public_identity)
    refusals()
    step("every scenario passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as error:
        print(f"conformance: FAILED: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
