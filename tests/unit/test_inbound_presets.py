"""The inbound mapping presets for legacy exports (Shopify, Salesforce, HubSpot, Magento 2,
WooCommerce) and their connector profiles: each sample file uses the exact header row of
/work/shared/legacy-exports.md and the quirks real files have."""

from __future__ import annotations

import codecs
import csv
import io
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import custsync
from custsync import plugins, presets
from custsync.mapping import load_mapping_file
from custsync.model import SECRET_KEYS, Customer

# --- the header rows, verbatim from legacy-exports.md ----------------------------------


def header(line: str) -> list[str]:
    """A header row as the exporter writes it (quoted or not) -> its column names."""
    return next(csv.reader([line]))


SHOPIFY_CURRENT = header(
    "Customer ID,First Name,Last Name,Email,Accepts Email Marketing,"
    "Default Address Company,Default Address Address1,Default Address Address2,"
    "Default Address City,Default Address Province Code,Default Address Country Code,"
    "Default Address Zip,Default Address Phone,Phone,Accepts SMS Marketing,Total Spent,"
    "Total Orders,Note,Tax Exempt,Tags"
)
SHOPIFY_OLDER = header(
    "First Name,Last Name,Email,Company,Address1,Address2,City,Province,Province Code,"
    "Country,Country Code,Zip,Phone,Accepts Marketing,Total Spent,Total Orders,Tags,Note,"
    "Tax Exempt"
)
SALESFORCE = header(
    '"Id","IsDeleted","MasterRecordId","AccountId","LastName","FirstName","Salutation",'
    '"Name","MailingStreet","MailingCity","MailingState","MailingPostalCode",'
    '"MailingCountry","Phone","MobilePhone","HomePhone","Email","Title","Department",'
    '"LeadSource","Birthdate","Description","OwnerId","HasOptedOutOfEmail","DoNotCall",'
    '"CreatedDate","LastModifiedDate","SystemModstamp","EmailBouncedReason",'
    '"EmailBouncedDate"'
)
HUBSPOT = header(
    '"Record ID","First Name","Last Name","Email","Phone Number","Contact owner",'
    '"Primary Associated Company ID","Last Activity Date","Lead Status",'
    '"Marketing contact status","Create Date","Associated Company"'
)
MAGENTO = header(
    "email,_website,_store,confirmation,created_at,created_in,disable_auto_group_change,"
    "dob,firstname,gender,group_id,lastname,middlename,password_hash,prefix,rp_token,"
    "rp_token_created_at,store_id,suffix,taxvat,updated_at,website_id,password"
)
WOOCOMMERCE = header(
    "customer_id,first_name,last_name,email,date_registered,billing_first_name,"
    "billing_last_name,billing_company,billing_email,billing_phone,billing_address_1,"
    "billing_address_2,billing_postcode,billing_city,billing_state,billing_country,"
    "shipping_first_name,shipping_last_name,shipping_company,shipping_address_1,"
    "shipping_address_2,shipping_postcode,shipping_city,shipping_state,shipping_country"
)

PRESETS = [
    "shopify_customers",
    "salesforce_contacts",
    "hubspot_contacts",
    "magento_customers",
    "woocommerce_customers",
]
PROFILES = {
    "shopify_csv": "shopify_customers",
    "salesforce_dataloader": "salesforce_contacts",
    "hubspot_export": "hubspot_contacts",
    "magento_export": "magento_customers",
    "woocommerce_export": "woocommerce_customers",
}

# Magento secrets planted in the sample rows: none of them may come out.
PASSWORD_HASH = "5f4dcc3b5aa765d61d8327deb882cf99:Xy9zQ2rT:1"
RP_TOKEN = "rp0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5"
PASSWORD = "Hunter2-plaintext!"
CONFIRMATION = "cf7e0d7b1a2c3d4e5f60718293a4b5c6"


# --- helpers ----------------------------------------------------------------------------


def write_csv(
    path: Path,
    header: Sequence[str],
    rows: Sequence[Mapping[str, str]],
    *,
    encoding: str = "utf-8",
    delimiter: str = ",",
    quoting: int = csv.QUOTE_MINIMAL,
) -> Path:
    """A CSV file as an exporter writes it: CRLF line ends, cells in header order (cells a
    row does not name are empty); ``utf-8-sig`` writes a BOM."""
    text = io.StringIO()
    writer = csv.writer(text, delimiter=delimiter, quoting=quoting, lineterminator="\r\n")
    writer.writerow(header)
    for row in rows:
        unknown = set(row) - set(header)
        assert not unknown, f"sample row names columns not in the header: {unknown}"
        writer.writerow([row.get(name, "") for name in header])
    path.write_bytes(text.getvalue().encode(encoding))
    return path


def read(base: Path, file: Path, mapping: str, **source: Any) -> list[dict[str, Any]]:
    """``custsync.read_customers`` with the preset, as a list of rows (NaN -> None)."""
    config = {"connector": "file", "path": file.name, "mapping": mapping, **source}
    frame = custsync.read_customers(config, base_dir=base)
    return [{k: _none_if_nan(v) for k, v in row.items()} for row in frame.to_dict("records")]


def customers(base: Path, file: Path, mapping: str) -> list[Customer]:
    config = {"connector": "file", "path": file.name, "mapping": mapping}
    return [c for batch in custsync.iter_customers(config, base_dir=base) for c in batch]


def _none_if_nan(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is pd.NaT:
        return None
    return value


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


# --- every preset and profile -------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_compiles_as_inbound(name: str) -> None:
    preset = load_mapping_file(name)

    compiled = preset.compile(direction="inbound")

    assert preset.direction == "inbound"
    assert preset.description.strip()
    assert {"email", "reference", "reference_origin"} <= set(compiled.field_names)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_is_listed_among_the_shipped_mappings(name: str) -> None:
    assert name in presets.mapping_names()


@pytest.mark.parametrize("name", PRESETS)
def test_preset_names_its_platform_as_reference_origin(name: str) -> None:
    compiled = load_mapping_file(name).compile(direction="inbound")

    record = compiled.apply_one({})

    assert record["reference_origin"] == name.split("_")[0]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_reads_no_secret_column(name: str) -> None:
    compiled = load_mapping_file(name).compile(direction="inbound")

    read_columns = {path.lower() for path in compiled.source_paths()}

    assert not read_columns & (SECRET_KEYS | {"confirmation"})


@pytest.mark.parametrize(("profile", "mapping"), sorted(PROFILES.items()))
def test_connector_profile_is_found_with_its_preset(profile: str, mapping: str) -> None:
    connector = plugins.find("source", profile)

    assert connector.kind == "source"
    assert connector.defaults == {"connector": "file", "format": "csv", "mapping": mapping}
    assert connector.description
    assert profile in {c.name for c in plugins.available("source")}


# --- Shopify ------------------------------------------------------------------------------

SHOPIFY_ROW = {
    "Customer ID": "'8779761975521",
    "First Name": "Rahim",
    "Last Name": "Uddin",
    "Email": " Rahim.Uddin@Example.COM  ",
    "Accepts Email Marketing": "yes",
    "Default Address Company": "Uddin Traders",
    "Default Address Address1": "House 12, Road 5",
    "Default Address Address2": "Dhanmondi",
    "Default Address City": "Dhaka",
    "Default Address Province Code": "",
    "Default Address Country Code": "BD",
    "Default Address Zip": "'01209",
    "Default Address Phone": "'+8801912010702",
    "Phone": "'+8801912010701",
    "Accepts SMS Marketing": "no",
    "Total Spent": "1234.50",
    "Total Orders": "7",
    "Note": "Prefers morning delivery.\nCall before 9am.",
    "Tax Exempt": "no",
    "Tags": "vip, wholesale",
}


def test_shopify_current_layout(tmp_path: Path) -> None:
    file = write_csv(tmp_path / "customers_export.csv", SHOPIFY_CURRENT, [SHOPIFY_ROW])

    [row] = read(tmp_path, file, "shopify_customers")

    assert row["email"] == "rahim.uddin@example.com"
    assert row["reference"] == "8779761975521"
    assert row["reference_origin"] == "shopify"
    assert row["metadata.shopify_id"] == "8779761975521"
    assert row["metadata.first_name"] == "Rahim"
    assert row["metadata.last_name"] == "Uddin"
    assert row["metadata.company"] == "Uddin Traders"
    assert row["metadata.phone"] == "+8801912010701"
    assert row["metadata.address_phone"] == "+8801912010702"
    assert row["metadata.address1"] == "House 12, Road 5"
    assert row["metadata.city"] == "Dhaka"
    assert row["metadata.country_code"] == "BD"
    assert row["metadata.zip"] == "01209"
    assert row["metadata.accepts_email_marketing"] is True
    assert row["metadata.accepts_sms_marketing"] is False
    assert row["metadata.tax_exempt"] is False
    assert row["metadata.total_spent"] == 1234.5
    assert row["metadata.total_orders"] == 7
    assert row["metadata.tags"] == "vip, wholesale"
    assert row["metadata.note"] == "Prefers morning delivery.\nCall before 9am."


def test_shopify_older_layout_in_windows_1252(tmp_path: Path) -> None:
    older = {
        "First Name": "Jürgen",
        "Last Name": "Müller",
        "Email": "JUERGEN@example.de ",
        "Company": "Müller & Söhne",
        "Address1": "Bahnhofstraße 1",
        "City": "Zürich",
        "Province": "Zürich",
        "Province Code": "ZH",
        "Country": "Switzerland",
        "Country Code": "CH",
        "Zip": "8001",
        "Phone": "'+41 44 123 45 67",
        "Accepts Marketing": "yes",
        "Total Spent": "0.00",
        "Total Orders": "0",
        "Tax Exempt": "yes",
    }
    file = write_csv(tmp_path / "customer_template.csv", SHOPIFY_OLDER, [older], encoding="cp1252")

    [row] = read(tmp_path, file, "shopify_customers")

    assert row["email"] == "juergen@example.de"
    assert row.get("reference") is None  # the older layout has no Customer ID
    assert row["reference_origin"] == "shopify"
    assert row["metadata.last_name"] == "Müller"
    assert row["metadata.company"] == "Müller & Söhne"
    assert row["metadata.address1"] == "Bahnhofstraße 1"
    assert row["metadata.city"] == "Zürich"
    assert row["metadata.province"] == "Zürich"
    assert row["metadata.province_code"] == "ZH"
    assert row["metadata.country"] == "Switzerland"
    assert row["metadata.country_code"] == "CH"
    assert row["metadata.phone"] == "+41 44 123 45 67"
    assert row["metadata.accepts_email_marketing"] is True
    assert row["metadata.tax_exempt"] is True
    assert row["metadata.total_orders"] == 0


def test_shopify_newer_export_with_an_appended_column(tmp_path: Path) -> None:
    header = [*SHOPIFY_CURRENT, "Accepts WhatsApp Marketing"]
    file = write_csv(
        tmp_path / "customers.csv", header, [{**SHOPIFY_ROW, "Accepts WhatsApp Marketing": "yes"}]
    )

    [row] = read(tmp_path, file, "shopify_customers")

    assert row["metadata.accepts_whatsapp_marketing"] is True
    assert row["reference"] == "8779761975521"


def test_shopify_profile_reads_without_naming_the_mapping(tmp_path: Path) -> None:
    write_csv(tmp_path / "export.csv", SHOPIFY_CURRENT, [SHOPIFY_ROW])

    frame = custsync.read_customers(
        {"connector": "shopify_csv", "path": "export.csv"}, base_dir=tmp_path
    )

    assert frame["email"].tolist() == ["rahim.uddin@example.com"]
    assert frame["reference"].tolist() == ["8779761975521"]


# --- Salesforce ---------------------------------------------------------------------------

SALESFORCE_ROW = {
    "Id": "0035g00000Abc12AAB",
    "IsDeleted": "false",
    "MasterRecordId": "",
    "AccountId": "0015g00000XyZ99AAA",
    "LastName": "Okafor",
    "FirstName": "Chidi",
    "Salutation": "Mr.",
    "Name": "Chidi Okafor",
    "MailingStreet": "1 Market St\nSuite 300",
    "MailingCity": "San Francisco",
    "MailingState": "CA",
    "MailingPostalCode": "94105",
    "MailingCountry": "United States",
    "Phone": "(415) 555-0101",
    "MobilePhone": "+1 415 555 0199",
    "Email": "Chidi.Okafor@Acme.com ",
    "Title": "Buyer",
    "Department": "Procurement",
    "LeadSource": "Web",
    "Birthdate": "1985-07-14",
    "Description": "Met at Dreamforce",
    "OwnerId": "0055g00000Own01AAA",
    "HasOptedOutOfEmail": "true",
    "DoNotCall": "false",
    "CreatedDate": "2023-11-02T08:15:30.000Z",
    "LastModifiedDate": "2024-03-12T09:14:05.000Z",
    "SystemModstamp": "2024-03-12T09:14:06.000Z",
}


@pytest.mark.parametrize("case", [str, str.upper, str.lower], ids=["api", "upper", "lower"])
def test_salesforce_headers_in_any_case(tmp_path: Path, case: Callable[[str], str]) -> None:
    header = [case(name) for name in SALESFORCE]
    row = {case(name): value for name, value in SALESFORCE_ROW.items()}
    file = write_csv(tmp_path / "extract.csv", header, [row], quoting=csv.QUOTE_ALL)

    [out] = read(tmp_path, file, "salesforce_contacts")

    assert out["email"] == "chidi.okafor@acme.com"
    assert out["reference"] == "0035g00000Abc12AAB"
    assert out["reference_origin"] == "salesforce"
    assert out["created_at"] == utc(2023, 11, 2, 8, 15, 30)
    assert out["updated_at"] == utc(2024, 3, 12, 9, 14, 5)
    assert out["metadata.salesforce_id"] == "0035g00000Abc12AAB"
    assert out["metadata.salesforce_account_id"] == "0015g00000XyZ99AAA"
    assert out["metadata.first_name"] == "Chidi"
    assert out["metadata.last_name"] == "Okafor"
    assert out["metadata.address1"] == "1 Market St\nSuite 300"
    assert out["metadata.city"] == "San Francisco"
    assert out["metadata.mobile_phone"] == "+1 415 555 0199"
    assert out["metadata.email_opt_out"] is True
    assert out["metadata.do_not_call"] is False


def test_salesforce_is_deleted_becomes_a_boolean(tmp_path: Path) -> None:
    rows = [
        SALESFORCE_ROW,
        {
            **SALESFORCE_ROW,
            "Id": "0035g00000Del01AAA",
            "Email": "gone@acme.com",
            "IsDeleted": "true",
        },
    ]
    file = write_csv(tmp_path / "queryall.csv", SALESFORCE, rows, quoting=csv.QUOTE_ALL)

    out = read(tmp_path, file, "salesforce_contacts")

    assert [(r["reference"], r["metadata.is_deleted"]) for r in out] == [
        ("0035g00000Abc12AAB", False),
        ("0035g00000Del01AAA", True),
    ]


def test_salesforce_falls_back_to_system_modstamp(tmp_path: Path) -> None:
    header = [name for name in SALESFORCE if name != "LastModifiedDate"]
    row = {k: v for k, v in SALESFORCE_ROW.items() if k != "LastModifiedDate"}
    file = write_csv(tmp_path / "extract.csv", header, [row])

    [out] = read(tmp_path, file, "salesforce_contacts")

    assert out["updated_at"] == utc(2024, 3, 12, 9, 14, 6)


def test_salesforce_report_export_with_labels(tmp_path: Path) -> None:
    labels = ["First Name", "Last Name", "Email", "Mailing Street", "Mailing City", "Mobile"]
    row = {
        "First Name": "Chidi",
        "Last Name": "Okafor",
        "Email": "chidi.okafor@acme.com",
        "Mailing Street": "1 Market St",
        "Mailing City": "San Francisco",
        "Mobile": "+1 415 555 0199",
    }
    file = write_csv(tmp_path / "report.csv", labels, [row])

    [out] = read(tmp_path, file, "salesforce_contacts")

    assert out["email"] == "chidi.okafor@acme.com"
    assert out["metadata.first_name"] == "Chidi"
    assert out["metadata.address1"] == "1 Market St"
    assert out["metadata.city"] == "San Francisco"
    assert out["metadata.mobile_phone"] == "+1 415 555 0199"


def test_salesforce_profile_reads_a_data_loader_file(tmp_path: Path) -> None:
    header = [name.upper() for name in SALESFORCE]
    row = {name.upper(): value for name, value in SALESFORCE_ROW.items()}
    write_csv(tmp_path / "extract.csv", header, [row], quoting=csv.QUOTE_ALL)

    frame = custsync.read_customers(
        {"connector": "salesforce_dataloader", "path": "extract.csv"}, base_dir=tmp_path
    )

    assert frame["reference"].tolist() == ["0035g00000Abc12AAB"]


# --- HubSpot ------------------------------------------------------------------------------

HUBSPOT_ROWS = [
    {
        "Record ID": "51234567801",
        "First Name": "Sofía",
        "Last Name": "Núñez",
        "Email": "Sofia.Nunez@Example.es ",
        "Phone Number": "+34 612 345 678",
        "Contact owner": "Laura Pérez",
        "Primary Associated Company ID": "18298765432",
        "Last Activity Date": "2024-03-12 09:14",
        "Lead Status": "Open",
        "Marketing contact status": "Marketing contact",
        "Create Date": "2023-06-01 17:45",
        "Associated Company": "Núñez Diseño SL",
    },
    {
        "Record ID": "51234567802",
        "Email": "no-activity@example.com",
        "Create Date": "2024-01-05 08:00",
        "Marketing contact status": "Non-marketing contact",
    },
]


def test_hubspot_export_with_a_bom(tmp_path: Path) -> None:
    file = write_csv(
        tmp_path / "hubspot-crm-exports-all-contacts.csv",
        HUBSPOT,
        HUBSPOT_ROWS,
        encoding="utf-8-sig",
        quoting=csv.QUOTE_ALL,
    )
    assert file.read_bytes().startswith(codecs.BOM_UTF8)

    first, _ = read(tmp_path, file, "hubspot_contacts")

    assert first["email"] == "sofia.nunez@example.es"
    assert first["reference"] == "51234567801"
    assert first["reference_origin"] == "hubspot"
    assert first["metadata.hubspot_id"] == "51234567801"
    assert first["metadata.first_name"] == "Sofía"
    assert first["metadata.last_name"] == "Núñez"
    assert first["metadata.phone"] == "+34 612 345 678"
    assert first["metadata.company"] == "Núñez Diseño SL"
    assert first["metadata.hubspot_company_id"] == "18298765432"
    assert first["metadata.hubspot_owner"] == "Laura Pérez"
    assert first["metadata.lead_status"] == "Open"
    assert first["metadata.marketing_contact_status"] == "Marketing contact"


def test_hubspot_dates_are_read_as_utc(tmp_path: Path) -> None:
    file = write_csv(tmp_path / "contacts.csv", HUBSPOT, HUBSPOT_ROWS)

    first, second = read(tmp_path, file, "hubspot_contacts")

    assert first["created_at"] == utc(2023, 6, 1, 17, 45)
    assert first["updated_at"] == utc(2024, 3, 12, 9, 14)
    assert first["metadata.last_activity_at"] == utc(2024, 3, 12, 9, 14)
    # No activity yet: the record last changed when it was created.
    assert second["created_at"] == utc(2024, 1, 5, 8, 0)
    assert second["updated_at"] == utc(2024, 1, 5, 8, 0)


# --- Magento 2 ----------------------------------------------------------------------------

MAGENTO_ROWS = [
    {
        "email": "Anna.Schmidt@Example.de ",
        "_website": "base",
        "_store": "default",
        "confirmation": CONFIRMATION,
        "created_at": "09/01/24 12:49",
        "created_in": "Default Store View",
        "disable_auto_group_change": "0",
        "dob": "1990-02-28",
        "firstname": "Anna",
        "gender": "2",
        "group_id": "1",
        "lastname": "Schmidt-Größer",
        "middlename": "",
        "password_hash": PASSWORD_HASH,
        "prefix": "Frau",
        "rp_token": RP_TOKEN,
        "rp_token_created_at": "10/01/24 08:00",
        "store_id": "1",
        "suffix": "",
        "taxvat": "DE123456789",
        "updated_at": "13/02/24 07:05",
        "website_id": "1",
        "password": PASSWORD,
    },
    {
        "email": "anna.schmidt@example.de",
        "_website": "b2b",
        "_store": "b2b_de",
        "created_at": "2024-01-20 10:00:00",
        "created_in": "B2B Store View",
        "firstname": "Anna",
        "lastname": "Schmidt-Größer",
        "gender": "Female",
        "group_id": "2",
        "password_hash": PASSWORD_HASH,
        "store_id": "3",
        "updated_at": "2024-02-01 11:30:00",
        "website_id": "2",
    },
]


def magento_file(tmp_path: Path) -> Path:
    # A German admin's export: ';' as the separator.
    return write_csv(tmp_path / "customer.csv", MAGENTO, MAGENTO_ROWS, delimiter=";")


def test_magento_export(tmp_path: Path) -> None:
    first, _ = read(tmp_path, magento_file(tmp_path), "magento_customers")

    assert first["email"] == "anna.schmidt@example.de"
    assert first["reference"] == "anna.schmidt@example.de"
    assert first["reference_origin"] == "magento"
    assert first["metadata.magento_website"] == "base"
    assert first["metadata.magento_website_id"] == 1
    assert first["metadata.magento_store"] == "default"
    assert first["metadata.magento_group_id"] == 1
    assert first["metadata.magento_disable_auto_group_change"] is False
    assert first["metadata.first_name"] == "Anna"
    assert first["metadata.last_name"] == "Schmidt-Größer"
    assert first["metadata.prefix"] == "Frau"
    assert first["metadata.gender"] == "female"
    assert first["metadata.birthdate"] == "1990-02-28"
    assert first["metadata.vat_number"] == "DE123456789"


def test_magento_dates_are_day_first_in_utc(tmp_path: Path) -> None:
    first, second = read(tmp_path, magento_file(tmp_path), "magento_customers")

    assert first["created_at"] == utc(2024, 1, 9, 12, 49)
    assert first["updated_at"] == utc(2024, 2, 13, 7, 5)
    assert second["created_at"] == utc(2024, 1, 20, 10, 0)  # ISO reads either way
    assert second["updated_at"] == utc(2024, 2, 1, 11, 30)


def test_magento_month_first_locale_overrides_date_order_in_a_copy(tmp_path: Path) -> None:
    preset = load_mapping_file("magento_customers").path.read_text(encoding="utf-8")
    assert 'date_order = "DMY"' in preset
    (tmp_path / "magento_us.toml").write_text(
        preset.replace('date_order = "DMY"', 'date_order = "MDY"'), encoding="utf-8"
    )
    row = {**MAGENTO_ROWS[0], "created_at": "09/01/24 12:49", "updated_at": "02/13/24 07:05"}
    file = write_csv(tmp_path / "customer.csv", MAGENTO, [row])

    [out] = read(tmp_path, file, "magento_us.toml")

    assert out["created_at"] == utc(2024, 9, 1, 12, 49)
    assert out["updated_at"] == utc(2024, 2, 13, 7, 5)


def test_magento_one_email_on_two_websites_stays_two_records(tmp_path: Path) -> None:
    out = read(tmp_path, magento_file(tmp_path), "magento_customers")

    assert [(r["reference"], r["metadata.magento_website"]) for r in out] == [
        ("anna.schmidt@example.de", "base"),
        ("anna.schmidt@example.de", "b2b"),
    ]


def test_magento_secrets_appear_nowhere(tmp_path: Path) -> None:
    file = magento_file(tmp_path)

    frame = custsync.read_customers(
        {"connector": "magento_export", "path": file.name}, base_dir=tmp_path
    )
    dumps = [
        text
        for customer in customers(tmp_path, file, "magento_customers")
        for text in (
            customer.model_dump_json(),
            repr(customer),
            str(customer.model_dump()),
            str(customer.model_dump(mode="json")),
        )
    ]

    assert len(frame) == 2
    cells = frame.astype(str).to_csv()
    for secret in (PASSWORD_HASH, RP_TOKEN, PASSWORD, CONFIRMATION, "Xy9zQ2rT"):
        assert secret not in cells
        assert not any(secret in text for text in dumps)
    leaf_names = {column.rsplit(".", 1)[-1].lower() for column in frame.columns}
    assert not leaf_names & {"password", "password_hash", "rp_token", "confirmation"}
    for name in ("password_hash", "rp_token", "confirmation", "'password'", '"password"'):
        assert not any(name in text for text in dumps)


# --- WooCommerce --------------------------------------------------------------------------

WOOCOMMERCE_ROWS = [
    {
        "customer_id": "42",
        "first_name": "Émile",
        "last_name": "Durand",
        "email": "Emile.Durand@Example.fr  ",
        "date_registered": "2023-09-30 21:07:44",
        "billing_first_name": "Émile",
        "billing_last_name": "Durand",
        "billing_company": "Durand SARL",
        "billing_email": "compta@durand.example.fr",
        "billing_phone": "+33 6 12 34 56 78",
        "billing_address_1": "12 rue de la Paix",
        "billing_postcode": "75002",
        "billing_city": "Paris",
        "billing_state": "",
        "billing_country": "fr",
        "shipping_first_name": "Émile",
        "shipping_last_name": "Durand",
        "shipping_address_1": "3 quai Voltaire",
        "shipping_postcode": "75007",
        "shipping_city": "Paris",
        "shipping_country": "FR",
    },
    {
        "customer_id": "0",
        "first_name": "",
        "last_name": "",
        "email": "",
        "billing_first_name": "Guest",
        "billing_last_name": "Buyer",
        "billing_email": " Guest.Buyer@Example.com ",
        "billing_phone": "0612345678",
        "billing_city": "Lyon",
        "billing_country": "FR",
    },
]


def test_woocommerce_registered_customer(tmp_path: Path) -> None:
    file = write_csv(tmp_path / "customers.csv", WOOCOMMERCE, WOOCOMMERCE_ROWS)

    registered, _ = read(tmp_path, file, "woocommerce_customers")

    assert registered["email"] == "emile.durand@example.fr"
    assert registered["reference"] == "42"
    assert registered["reference_origin"] == "woocommerce"
    assert registered["created_at"] == utc(2023, 9, 30, 21, 7, 44)
    assert registered["metadata.woocommerce_id"] == "42"
    assert registered["metadata.first_name"] == "Émile"
    assert registered["metadata.company"] == "Durand SARL"
    assert registered["metadata.billing_email"] == "compta@durand.example.fr"
    assert registered["metadata.address1"] == "12 rue de la Paix"
    assert registered["metadata.zip"] == "75002"
    assert registered["metadata.country_code"] == "FR"
    assert registered["metadata.shipping_address1"] == "3 quai Voltaire"
    assert registered["metadata.shipping_zip"] == "75007"


def test_woocommerce_guest_has_no_reference_and_keys_by_billing_email(tmp_path: Path) -> None:
    file = write_csv(tmp_path / "customers.csv", WOOCOMMERCE, WOOCOMMERCE_ROWS)

    _, guest = read(tmp_path, file, "woocommerce_customers")

    assert guest["reference"] is None  # customer_id 0: not an id
    assert guest["metadata.woocommerce_id"] is None
    assert guest["reference_origin"] == "woocommerce"
    assert guest["email"] == "guest.buyer@example.com"
    assert guest["metadata.first_name"] == "Guest"
    assert guest["metadata.last_name"] == "Buyer"
    assert guest["metadata.phone"] == "0612345678"
    assert guest["created_at"] is None
